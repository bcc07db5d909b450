"""The model is complete: recipes and layouts survive a JSON round trip unchanged."""

from __future__ import annotations

import json

from conftest import REPO, Product, avobuild_cli

from avobuild.disk.plan import DiskPlan, plan_layout
from avobuild.model.layout import Layout, load_layout
from avobuild.model.recipe import Recipe, load_recipe
from avobuild.model.serialize import from_jsonable, to_jsonable


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
