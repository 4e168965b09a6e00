"""With `--auth`, nothing but a login page is served to a client that has not signed in.

Gradio's own login leaves too much open: its page template embeds the API schema (and with it every list's
choices: the absolute paths of the runs' LoRAs) before anyone signs in, FastAPI's /openapi.json answers, and
so do a few other routes. So the whole app sits behind this gate: a request passes only with the session
cookie Gradio's own `POST /login` sets (the one route the gate lets through), and anyone else gets a small
login page of ours (no scripts or styles from the server) at `/` and 401 everywhere else.
"""
from __future__ import annotations

import html

from starlette.requests import HTTPConnection
from starlette.responses import HTMLResponse, JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

LOGIN_PATHS = ("/login", "/login/")
PAGE_PATHS = ("/", "")
# Gradio's launch() asks this of its own server before it returns; it answers true or false, nothing more.
STARTUP_PATH = "/gradio_api/startup-events"


class LoginGate:
    """ASGI middleware in front of Gradio's app (passed as FastAPI middleware through `launch(app_kwargs=...)`)."""

    def __init__(self, app: ASGIApp, message: str = "Sign in."):
        self.app = app
        self.page = LOGIN_PAGE.replace("{message}", html.escape(message))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or signed_in(scope) or _is_open(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation: not signed in
            return
        if scope["path"] in PAGE_PATHS and scope["method"] in ("GET", "HEAD"):
            response = HTMLResponse(self.page, headers={"Cache-Control": "no-store"})
        else:
            response = JSONResponse({"detail": "Not authenticated"}, status_code=401)
        await response(scope, receive, send)


def signed_in(scope: Scope) -> bool:
    """Whether the request carries a session Gradio's login handed out (Gradio keeps them in `app.tokens`,
    under a cookie named after its `app.cookie_id`; the second name is the one plain http keeps)."""
    app = scope.get("app")
    tokens, cookie_id = getattr(app, "tokens", None), getattr(app, "cookie_id", None)
    if not tokens or not cookie_id:
        return False
    cookies = HTTPConnection(scope).cookies
    token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
    return token is not None and token in tokens


def _is_open(scope: Scope) -> bool:
    """The routes that work without a session: the login itself, and Gradio's start-up ping."""
    if scope["type"] != "http":
        return False
    method, path = scope["method"], scope["path"]
    return (method == "POST" and path in LOGIN_PATHS) or (method == "GET" and path == STARTUP_PATH)


# Self-contained on purpose: nothing else is served before the login, so the page needs no other file.
LOGIN_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sdlora: sign in</title>
<style>
  body { font-family: system-ui, sans-serif; background: #f6f4ef; color: #1f2937; display: flex;
         min-height: 100vh; margin: 0; align-items: center; justify-content: center; }
  form { background: #fff; padding: 2rem; border-radius: 12px; box-shadow: 0 2px 12px #0002; width: 20rem; }
  h1 { font-size: 1.3rem; margin: 0 0 .5rem; }
  label { display: block; margin-top: 1rem; font-size: .9rem; }
  input { width: 100%; box-sizing: border-box; padding: .5rem; margin-top: .25rem; font-size: 1rem; }
  button { margin-top: 1.5rem; width: 100%; padding: .6rem; font-size: 1rem; cursor: pointer; }
  #problem { color: #b91c1c; min-height: 1.2em; margin-top: 1rem; font-size: .9rem; }
</style>
</head>
<body>
<form id="login">
  <h1>sdlora</h1>
  <p>{message}</p>
  <label>User <input name="username" autocomplete="username" required autofocus></label>
  <label>Password <input name="password" type="password" autocomplete="current-password" required></label>
  <button type="submit">Sign in</button>
  <div id="problem" role="alert"></div>
</form>
<script>
  const form = document.getElementById("login");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const reply = await fetch("login", {method: "POST", body: new URLSearchParams(new FormData(form)),
                                        credentials: "same-origin"});
    if (reply.ok) { location.reload(); return; }
    document.getElementById("problem").textContent = "Wrong user or password; try again.";
  });
</script>
</body>
</html>
"""
