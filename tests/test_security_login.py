"""With --auth, a client that has not signed in gets the login page and nothing else: no API schema, no run
paths, no files, whatever the route; once signed in through Gradio's login, the page and the API work.
Plain HTTP against a server on 127.0.0.1, as an attacker on the network would try it."""
import json

import httpx
import pytest
from gradio_client import Client

from tests.ui_support import served_ui

USER, PASSWORD = "me", "s3cret"
LORA_NAME = "secret-style"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The UI with a login, over a runs folder holding one finished run (its file is in the Try list)."""
    root = tmp_path_factory.mktemp("login")
    run = root / "runs" / "finished-run"
    run.mkdir(parents=True)
    (run / "config.toml").write_text(f'name = "{LORA_NAME}"\n')
    (run / f"{LORA_NAME}.safetensors").write_bytes(b"weights")
    event = {"time": "2026-01-01T00:00:00+00:00", "event": "finished", "step": 1, "path": f"{LORA_NAME}.safetensors"}
    (run / "events.jsonl").write_text(json.dumps(event) + "\n")
    with served_ui(root, auth=f"{USER}:{PASSWORD}") as demo:
        yield demo.local_url.rstrip("/"), run


def client() -> httpx.Client:
    return httpx.Client(trust_env=False, follow_redirects=False, timeout=30)


def secrets_in(text: str, run) -> list[str]:
    """What must not reach a client that has not signed in: run paths and the API's description."""
    marks = [str(run.parent), LORA_NAME, "start_training", "named_endpoints", "api_name", "gradio_config"]
    return [mark for mark in marks if mark in text]


def file_routes(run) -> list[str]:
    lora = run / f"{LORA_NAME}.safetensors"
    return [f"/gradio_api/file={lora}", f"/file={lora}", f"/gradio_api/file/{lora}"]


ROUTES = ["/config", "/config/", "/info", "/gradio_api/info", "/gradio_api/config", "/openapi.json",
          "/gradio_api/openapi.json", "/docs", "/theme.css", "/gradio_api/app_id", "/token", "/user",
          "/gradio_api/queue/status", "/monitoring", "/manifest.json", "/gradio_api/api/list_runs",
          "/assets/index.js", "/gradio_api/upload_progress", "/gradio_api/heartbeat/x"]


def test_a_client_that_has_not_signed_in_sees_only_the_login_page(server):
    url, run = server
    with client() as http:
        page = http.get(url + "/")
        assert page.status_code == 200 and "<form" in page.text and "--auth" in page.text
        assert secrets_in(page.text, run) == []
        assert http.get(url + "/?__theme=dark").text == page.text  # the page with any query: the same login
        for route in ROUTES + file_routes(run):
            answer = http.get(url + route)
            assert (answer.status_code, secrets_in(answer.text, run)) == (401, []), route
        posted = http.post(url + "/gradio_api/run/list_runs", json={"data": []})
        assert posted.status_code == 401 and secrets_in(posted.text, run) == []


def test_a_wrong_password_does_not_open_it(server):
    url, run = server
    with client() as http:
        assert http.post(url + "/login", data={"username": USER, "password": "guess"}).status_code == 400
        assert http.get(url + "/config").status_code == 401
        assert secrets_in(http.get(url + "/").text, run) == []


def test_after_signing_in_the_page_the_files_and_the_api_work(server):
    url, run = server
    with client() as http:
        assert http.post(url + "/login", data={"username": USER, "password": PASSWORD}).json() == {"success": True}
        page = http.get(url + "/")
        assert page.status_code == 200 and "start_training" in page.text
        assert str(run / f"{LORA_NAME}.safetensors") in http.get(url + "/config").text  # the Try list's choice
        assert http.get(url + file_routes(run)[0]).content == b"weights"
    runs = Client(url + "/", auth=(USER, PASSWORD), verbose=False).predict(api_name="/list_runs")
    assert [r["final_file"] for r in runs] == [str(run / f"{LORA_NAME}.safetensors")]
