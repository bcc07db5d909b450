"""The model is complete: recipes and layouts survive a JSON round trip unchanged."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, Product, avobuild_cli

from avobuild.disk.plan import DiskPlan, plan_layout
from avobuild.errors import RecipeError
from avobuild.model.applier import Bootloader, InitSystem, Metric
from avobuild.model.layout import FsType, Layout, Role, TableType, load_layout
from avobuild.model.recipe import Architecture, Recipe, ToolSet, load_recipe
from avobuild.model.serialize import from_jsonable, to_jsonable
from avobuild.model.tomlcheck import Table, load_toml


def test_recipe_round_trip(product: Product) -> None:
    recipe = load_recipe(product.recipe)
    text = json.dumps(to_jsonable(recipe))
    assert from_jsonable(Recipe, json.loads(text)) == recipe


def test_demo_recipe_round_trip() -> None:
    recipe = load_recipe(REPO / "recipes" / "demo.toml")
    assert from_jsonable(Recipe, json.loads(json.dumps(to_jsonable(recipe)))) == recipe


def test_layout_and_plan_round_trip() -> None:
    layout = load_layout(REPO / "layouts" / "x86_64-efi-ab.toml")
    assert from_jsonable(Layout, to_jsonable(layout)) == layout
    plan = plan_layout(layout)
    assert from_jsonable(DiskPlan, json.loads(json.dumps(to_jsonable(plan)))) == plan


def test_recipe_show(product: Product) -> None:
    report = json.loads(avobuild_cli("recipe", "show", product.recipe).stdout)
    assert report["recipe"]["name"] == "testprod"
    assert report["recipe"]["layout"]["partitions"][0]["type_guid"] == (
        "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
    )
    plan = plan_layout(load_recipe(product.recipe).layout)
    assert [p["offset"] for p in report["partitions"]] == [p.offset for p in plan.partitions]
    assert report["disk_size"] == plan.disk_size


def test_every_shipped_layout_and_recipe_loads() -> None:
    layouts = sorted((REPO / "layouts").glob("*.toml"))
    assert len(layouts) >= 2
    for path in layouts:
        plan = plan_layout(load_layout(path))
        assert plan.disk_size > sum(p.size for p in plan.partitions)
    versions = {load_recipe(path).version for path in (REPO / "recipes").glob("*.toml")}
    assert {"1.0.0", "1.1.0"} <= versions


def test_demo_v2_differs_from_demo_only_by_version_and_motd() -> None:
    import tomllib

    v1 = tomllib.loads((REPO / "recipes" / "demo.toml").read_text())
    v2 = tomllib.loads((REPO / "recipes" / "demo-v2.toml").read_text())
    assert (v1["product"].pop("version"), v2["product"].pop("version")) == ("1.0.0", "1.1.0")
    added = [f for f in v2["rootfs"]["file"] if f not in v1["rootfs"]["file"]]
    assert added == [{"source": "demo/v2/motd", "dest": "/etc/motd", "mode": "0644"}]
    v2["rootfs"]["file"].remove(added[0])
    assert v1 == v2


@pytest.mark.parametrize(
    ("toml", "read", "expected"),
    [
        ('architecture = "m68k"', lambda t: t.enum("architecture", Architecture),
         "[t] architecture: expected one of x86_64, aarch64, arm, riscv64, i686, got 'm68k'"),
        ('role = "userdata"', lambda t: t.enum("role", Role),
         "[t] role: expected one of boot, system-a, system-b, kernel-a, kernel-b, "
         "extensions-a, extensions-b, data, recovery, other, got 'userdata'"),
        ('table = "apm"', lambda t: t.enum("table", TableType, default=TableType.GPT),
         "[t] table: expected \"gpt\" or \"mbr\", got 'apm'"),
        ('filesystem = "ntfs"', lambda t: t.optional_enum("filesystem", FsType, absent=("raw",)),
         "[t] filesystem: expected one of ext4, vfat, squashfs, erofs, raw, got 'ntfs'"),
        ('filesystem = "ext4"',
         lambda t: t.enum("filesystem", FsType, choices=(FsType.SQUASHFS, FsType.EROFS)),
         "[t] filesystem: expected \"squashfs\" or \"erofs\", got 'ext4'"),
        ('bootloader = "lilo"', lambda t: t.enum("bootloader", Bootloader),
         "[t] bootloader: expected \"grub\" or \"u-boot\", got 'lilo'"),
        ('init = "sysv"', lambda t: t.enum("init", InitSystem),
         "[t] init: expected \"systemd\" or \"busybox\", got 'sysv'"),
        ('metric = "load"', lambda t: t.enum("metric", Metric),
         "[t] metric: expected \"memory_usage\" or \"cpu_temperature\", got 'load'"),
        ('tools = ["storage", "games"]',
         lambda t: t.enum_list("tools", ToolSet, default=(), what="tool sets"),
         "[t] tools: expected tool sets among diagnostics, network, storage, got 'games'"),
        ("role = 3", lambda t: t.enum("role", Role), "[t] role: expected a string, got 3"),
    ],
)  # fmt: skip
def test_enum_errors_name_the_choices(
    tmp_path: Path, toml: str, read: Callable[[Table], object], expected: str
) -> None:
    path = tmp_path / "x.toml"
    path.write_text(f"[t]\n{toml}\n")
    table = load_toml(path).table("t")
    assert table is not None
    with pytest.raises(RecipeError) as error:
        read(table)
    assert str(error.value) == f"{path}: {expected}"


def test_enum_values_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text('[t]\nrole = "data"\nfilesystem = "raw"\ntools = ["network"]\n')
    table = load_toml(path).table("t")
    assert table is not None
    assert table.enum("role", Role) is Role.DATA
    assert table.enum("table", TableType, default=TableType.GPT) is TableType.GPT
    assert table.optional_enum("filesystem", FsType, absent=("raw",)) is None
    assert table.optional_enum("other", FsType) is None
    assert table.enum_list("tools", ToolSet, default=(), what="x") == [ToolSet.NETWORK]
    assert table.enum_list("more", ToolSet, default=(ToolSet.STORAGE,), what="x") == [
        ToolSet.STORAGE
    ]
    table.check_unknown()
