"""The first screen a newcomer sees offers the built-in demo dataset in plain sight: on the tab the page opens
on, above the gallery, inside nothing folded. Read from the page's Gradio config, without a browser."""
import pytest

from app.ui import build_ui


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    demo = build_ui(tmp_path_factory.mktemp("first-screen") / "runs", trainer_command=["false"])
    config = demo.get_config_file()
    components = {c["id"]: c for c in config["components"]}
    return components, config["layout"]


def path_to(layout: dict, wanted: int) -> list[int] | None:
    """The ids from the page's root down to component `wanted`."""
    if layout["id"] == wanted:
        return [wanted]
    for child in layout.get("children", []):
        found = path_to(child, wanted)
        if found:
            return [layout["id"], *found]
    return None


def by_elem_id(components: dict, elem_id: str) -> dict:
    (found,) = [c for c in components.values() if c["props"].get("elem_id") == elem_id]
    return found


def test_the_demo_dataset_is_offered_open_on_the_first_tab(page):
    components, layout = page
    button = by_elem_id(components, "demo-create")
    assert button["props"]["value"] == "Create demo dataset"
    ancestors = [components[i] for i in path_to(layout, button["id"])[:-1] if i in components]
    assert all(a["props"].get("visible", True) is True for a in ancestors)
    assert [a["props"]["label"] for a in ancestors if a["type"] == "accordion"] == []  # nothing to unfold
    (tab,) = [a for a in ancestors if a["type"] == "tabitem"]
    (tabs,) = [a for a in ancestors if a["type"] == "tabs"]
    assert tab["props"]["id"] == tabs["props"]["selected"] == "dataset"  # the tab the page opens on

    intro = by_elem_id(components, "demo-intro")  # the label, in the same box as the button
    assert intro["props"]["value"].startswith("### No images yet? Create the demo dataset\n")
    box = by_elem_id(components, "demo-dataset")["id"]
    assert box in path_to(layout, intro["id"]) and box in path_to(layout, button["id"])


def test_the_demo_comes_before_the_gallery(page):
    components, layout = page
    order = []

    def walk(node):
        order.append(node["id"])
        for child in node.get("children", []):
            walk(child)

    walk(layout)
    assert order.index(by_elem_id(components, "demo-create")["id"]) < \
        order.index(by_elem_id(components, "dataset-gallery")["id"])
