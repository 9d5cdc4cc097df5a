"""The browser chat (web/static) in real headless Chromium (Debian's /usr/bin/chromium, never a downloaded
browser) against a live `ortllm serve` with the real model. Screenshots go to test-output/ui/."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import requests

from .conftest import DEFAULT_MODEL, REPO, LiveServer

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")

CHROMIUM = (
    os.environ.get("ORTLLM_CHROMIUM")
    or shutil.which("chromium")
    or shutil.which("chromium-browser")
    or "/usr/bin/chromium"
)
if not Path(CHROMIUM).exists():
    pytest.skip("no Chromium: apt-get install chromium (make test does)", allow_module_level=True)

pytestmark = [pytest.mark.model, pytest.mark.slow]
# flags that keep a sandboxed, offline headless Chromium from hanging
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = REPO / "test-output" / "ui"
PARIS = "What is the capital of France?"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


class Page:
    """A page in a fresh browser context, with what the tests watch: dialogs, page errors, frames."""

    def __init__(self, browser, theme: str = "dark") -> None:
        self.context = browser.new_context(
            viewport={"width": 1280, "height": 800}, color_scheme=theme, accept_downloads=True
        )
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.sent: list[str] = []
        self.received: list[str] = []
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("websocket", self._watch_ws)

    def _watch_ws(self, ws) -> None:
        ws.on("framesent", lambda payload: self.sent.append(payload if isinstance(payload, str) else ""))
        ws.on(
            "framereceived", lambda payload: self.received.append(payload if isinstance(payload, str) else "")
        )

    def open(self, url: str, connected: bool = True) -> None:
        self.page.goto(url + "/")
        self.page.wait_for_selector("html[data-ready=true]")
        if connected:
            self.page.wait_for_selector("#conn[data-state=connected]")

    def setting(self, key: str, value: float) -> None:
        if self.page.is_hidden("#settings"):
            self.page.click("#settings-btn")
        self.page.fill(f"#{key}-num", str(value))
        self.page.press(f"#{key}-num", "Tab")
        self.page.click("#settings-close")

    def send(self, text: str, wait: bool = True) -> None:
        before = self.page.locator(".msg.assistant").count()
        self.page.fill("#composer-input", text)
        self.page.press("#composer-input", "Enter")
        if wait:
            self.wait_answer(before + 1)

    def wait_answer(self, count: int, timeout: float = 60_000) -> None:
        self.page.wait_for_function(
            """n => document.querySelectorAll('.msg.assistant').length >= n
                   && !document.querySelector('.msg.streaming')
                   && document.getElementById('messages').getAttribute('aria-busy') === 'false'""",
            arg=count,
            timeout=timeout,
        )

    def ends(self) -> int:
        """How many answers the server has finished over the WebSocket (`__END__` frames)."""
        return sum(f.startswith("__END__:") for f in self.received)

    def wait_ends(self, count: int, timeout_s: float = 60) -> None:
        for _ in range(int(timeout_s * 20)):
            if self.ends() >= count:
                return
            self.page.wait_for_timeout(50)
        raise AssertionError(f"{self.ends()} answers ended, expected {count}")

    def answers(self) -> list[str]:
        return self.page.locator(".msg.assistant .content").all_inner_texts()

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"))

    def close(self) -> None:
        assert not self.errors, f"errors in the page: {self.errors}"
        self.context.close()


@pytest.fixture
def ui(browser):
    page = Page(browser)
    yield page
    page.close()


def seed_session(url: str, title: str, messages: list[dict[str, str]], headers: dict | None = None) -> str:
    r = requests.post(
        f"{url}/api/sessions",
        json={"title": title, "model": DEFAULT_MODEL, "messages": messages, "origin": "ui"},
        headers=headers or {},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    return r.json()["id"]


def server_messages(url: str, session_id: str) -> list[dict[str, str]]:
    r = requests.get(f"{url}/api/sessions/{session_id}", timeout=10)
    r.raise_for_status()
    return [{"role": m["role"], "content": m["content"]} for m in r.json()["messages"]]


def current_session(ui: Page) -> str:
    return json.loads(ui.page.evaluate("localStorage.getItem('ortllm.session')"))


# ---- serving --------------------------------------------------------------------------------------


def test_root_serves_the_page_to_browsers_and_json_to_api_clients(server):
    page = requests.get(server.url + "/", headers={"Accept": "text/html,application/xhtml+xml"}, timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert '<script type="module" src="/ui/app.js">' in page.text
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    info = requests.get(server.url + "/", timeout=10).json()
    assert info["name"] == "ortllm" and DEFAULT_MODEL in info["models"]
    for path in (
        "app.js",
        "vendor/marked/marked.esm.js",
        "vendor/dompurify/purify.es.mjs",
        "vendor/highlight/highlight.min.js",
    ):
        r = requests.get(f"{server.url}/ui/{path}", timeout=10)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/javascript"), path
    assert (
        requests.get(server.url + "/ui/style.css", timeout=10).headers["Content-Type"].startswith("text/css")
    )
    assert requests.get(server.url + "/ui/../native.py", timeout=10).status_code == 404
    # no CDN: every script and stylesheet the page loads is its own
    html = page.text + "".join(p.read_text() for p in (REPO / "web" / "static").glob("*.js"))
    assert not re.search(r"""(src|href)=["']https?://""", html) and "cdn" not in html.lower()
    vendor = (REPO / "web" / "static" / "vendor" / "VENDOR.md").read_text()
    for name in ("marked", "dompurify", "@highlightjs/cdn-assets"):
        assert re.search(rf"\[{re.escape(name)}\][^|]*\| \d+\.\d+\.\d+ \|", vendor), name
    for lib in ("marked", "dompurify", "highlight"):
        assert (REPO / "web" / "static" / "vendor" / lib / "LICENSE").is_file()


# ---- chatting -------------------------------------------------------------------------------------

# point the page's WebSocket at a path the server does not serve: the upgrade fails like a blocking proxy
NO_WEBSOCKET = """{
    const Real = window.WebSocket;
    window.WebSocket = class extends Real { constructor(url, p) { super(url.replace('/chat/ws', '/no-such-ws'), p); } };
}"""


def test_streams_an_answer_over_the_websocket_with_live_stats(ui, server):
    ui.open(server.url)
    assert ui.page.get_attribute("#conn", "data-mode") == "ws"
    ui.setting("temperature", 0)
    ui.page.evaluate("""() => {
        window.__partials = new Set();
        new MutationObserver(() => {
            const m = document.querySelector('.msg.assistant.streaming .content');
            if (m && m.textContent) window.__partials.add(m.textContent);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    ui.send(PARIS)
    assert "Paris" in ui.answers()[-1]
    assert ui.page.evaluate("window.__partials.size") >= 2, "the answer did not arrive in pieces"
    assert int(ui.page.inner_text("#stat-tokens")) > 0
    assert re.fullmatch(r"\d+(\.\d+)?", ui.page.inner_text("#stat-tps")), ui.page.inner_text("#stat-tps")
    assert re.fullmatch(r"\d+(\.\d+)? (ms|s)", ui.page.inner_text("#stat-ttft"))
    # multi-turn WebSocket protocol: kebab-case request, __START__ / tokens / __END__
    request = json.loads(next(f for f in ui.sent if f.startswith("{")))
    assert (
        request["model-name"] == DEFAULT_MODEL and request["temperature"] == 0 and request["prompt"] == PARIS
    )
    assert any(f.startswith("__START__:") for f in ui.received) and any(
        f.startswith("__END__:") for f in ui.received
    )
    # the conversation is a server session, listed in the sidebar
    sid = current_session(ui)
    assert [m["role"] for m in server_messages(server.url, sid)] == ["user", "assistant"]
    assert ui.page.locator(f'.session-item[data-id="{sid}"]').count() == 1
    ui.shot("chat-dark")
    ui.page.click("#theme-btn")
    assert ui.page.get_attribute("html", "data-theme") == "light"
    ui.shot("chat-light")


def test_sse_fallback_when_the_websocket_fails(ui, server):
    ui.page.add_init_script(NO_WEBSOCKET)
    ui.open(server.url)
    ui.page.wait_for_selector("#conn[data-mode=sse]")
    assert ui.page.inner_text("#conn-text") == "connected (SSE)"
    ui.setting("temperature", 0)
    ui.send(PARIS)
    assert "Paris" in ui.answers()[-1]
    assert re.fullmatch(r"\d+(\.\d+)?", ui.page.inner_text("#stat-tps"))
    assert [m["role"] for m in server_messages(server.url, current_session(ui))] == ["user", "assistant"]


def test_sse_fallback_sends_the_system_prompt_options_and_stop_sequences(ui, server):
    ui.page.add_init_script(NO_WEBSOCKET)
    # the page's own POST /api/sessions is refused (it then lets the chat request create the session), so
    # the stored system prompt can only come from what /api/chat was sent
    ui.page.route(
        "**/api/sessions",
        lambda route: (
            route.fulfill(status=404, content_type="application/json", body='{"detail": "not here"}')
            if route.request.method == "POST"
            else route.continue_()
        ),
    )
    bodies: list[dict] = []
    ui.page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/api/chat") else None)
    ui.open(server.url)
    ui.page.wait_for_selector("#conn[data-mode=sse]")
    ui.page.click("#settings-btn")
    ui.page.fill("#temperature-num", "0")
    ui.page.fill("#max_tokens-num", "16")
    ui.page.fill("#stop-seqs", "END\n###")
    ui.page.fill("#system-prompt", "You are terse.")
    ui.page.press("#system-prompt", "Tab")
    ui.page.click("#settings-close")
    ui.send(PARIS)
    assert len(bodies) == 1 and "session_id" not in bodies[0]
    assert bodies[0]["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": PARIS},
    ]
    options = bodies[0]["options"]
    assert options["temperature"] == 0 and options["max_tokens"] == 16 and options["stop"] == ["END", "###"]
    shown = {key: float(ui.page.input_value(f"#{key}-num")) for key in ("top_p", "top_k", "repeat_penalty")}
    assert {key: options[key] for key in shown} == shown and len(options) == 6, options
    stored = requests.get(f"{server.url}/api/sessions/{current_session(ui)}", timeout=10).json()
    assert stored["system_prompt"] == "You are terse."
    assert [m["role"] for m in stored["messages"] if m["role"] != "system"] == ["user", "assistant"]


def test_stop_cancels_the_answer(ui, server):
    ui.open(server.url)
    ui.setting("max_tokens", 2048)
    ui.setting("temperature", 0.8)
    ui.send("Write a very long story about a dragon who learns to cook, with many chapters.", wait=False)
    ui.page.wait_for_selector("#stop-btn:not([hidden])")
    ui.page.wait_for_function(
        "() => (document.querySelector('.msg.assistant .content')?.textContent || '').length > 40"
    )
    ui.shot("streaming")
    ui.page.keyboard.press("Escape")  # Esc stops, like the Stop button
    ui.wait_answer(1, timeout=15_000)
    assert ui.page.inner_text(".msg.assistant .msg-note") == "Stopped."
    assert any(f.startswith("__END__:") and '"cancelled"' in f for f in ui.received)
    assert 0 < int(ui.page.inner_text("#stat-tokens")) < 2048
    assert ui.page.is_visible("#send-btn") and ui.page.is_hidden("#stop-btn")
    assert {"action": "cancel"} in [json.loads(f) for f in ui.sent if f.startswith("{")]


def test_regenerate_replaces_the_last_answer(ui, server):
    ui.open(server.url)
    ui.setting("max_tokens", 40)
    ui.send("Name a colour.")
    sid = current_session(ui)
    first = server_messages(server.url, sid)
    assert len(first) == 2
    ui.setting("temperature", 1.5)
    ends = ui.ends()
    ui.page.click(".regen-btn")
    ui.wait_ends(ends + 1)
    ui.wait_answer(1)
    after = server_messages(server.url, sid)
    assert [m["role"] for m in after] == ["user", "assistant"], after  # rolled back, then answered again
    assert after[0] == first[0] and after[1]["content"].strip()
    assert ui.page.locator(".msg.user").count() == 1


def test_edit_an_earlier_message_branches_and_keeps_the_old_branch(ui, server):
    ui.open(server.url)
    ui.setting("temperature", 0)
    ui.setting("max_tokens", 40)
    ui.send(PARIS)
    ui.send("And what is the capital of Germany?")
    original = current_session(ui)
    old = server_messages(server.url, original)
    assert len(old) == 4
    ui.page.locator(".msg.user").nth(1).locator(".edit-btn").click()
    ui.page.fill(".edit-input", "And what is the capital of Italy?")
    assert ui.page.locator(".msg.user").nth(1).locator(".content").is_hidden()  # the editor replaces the text
    ui.shot("editing")
    ui.page.click(".branch-btn")
    ui.page.wait_for_function(
        "id => localStorage.getItem('ortllm.session') !== JSON.stringify(id)", arg=original
    )
    ui.wait_answer(2)
    branch = current_session(ui)
    assert branch != original
    new = server_messages(server.url, branch)
    assert new[:2] == old[:2] and new[2] == {"role": "user", "content": "And what is the capital of Italy?"}
    assert len(new) == 4
    assert server_messages(server.url, original) == old  # the old branch is untouched
    assert ui.page.locator(f'.session-item[data-id="{original}"]').count() == 1
    assert ui.page.locator(f'.session-item[data-id="{branch}"]').count() == 1
    assert "(branch" in ui.page.inner_text("#convo-title")
    ui.shot("branched")
    ui.page.click("#branch-note .link-btn")  # back to the old branch
    ui.page.wait_for_function(
        "id => localStorage.getItem('ortllm.session') === JSON.stringify(id)", arg=original
    )
    ui.page.wait_for_selector(".msg.user >> nth=1")
    assert "Germany" in ui.page.locator(".msg.user").nth(1).inner_text()


def test_sessions_switch_rename_delete_and_survive_reload(ui, server):
    a = seed_session(
        server.url,
        "Session A",
        [{"role": "user", "content": "alpha question"}, {"role": "assistant", "content": "alpha answer"}],
    )
    b = seed_session(
        server.url,
        "Session B",
        [{"role": "user", "content": "beta question"}, {"role": "assistant", "content": "beta answer"}],
    )
    doomed = seed_session(server.url, "Doomed", [])
    ui.open(server.url)
    ui.page.click(f'.session-item[data-id="{a}"] .session-open')
    ui.page.wait_for_selector(".msg.assistant:has-text('alpha answer')")
    ui.page.click(f'.session-item[data-id="{b}"] .session-open')
    ui.page.wait_for_selector(".msg.assistant:has-text('beta answer')")
    assert ui.page.locator(".msg").count() == 2
    # rename in place
    ui.page.click(f'.session-item[data-id="{b}"] .session-rename')
    ui.page.fill(".rename-input", "Renamed B")
    ui.page.press(".rename-input", "Enter")
    ui.page.wait_for_selector(f'.session-item[data-id="{b}"] .session-title:has-text("Renamed B")')
    assert requests.get(f"{server.url}/api/sessions/{b}", timeout=10).json()["title"] == "Renamed B"
    # delete, with a confirmation
    ui.page.click(f'.session-item[data-id="{doomed}"] .session-delete')
    ui.page.click("#confirm-ok")
    ui.page.wait_for_selector(f'.session-item[data-id="{doomed}"]', state="detached")
    assert requests.get(f"{server.url}/api/sessions/{doomed}", timeout=10).status_code == 404
    # reload: the open conversation and the list come back from the server
    ui.page.reload()
    ui.page.wait_for_selector("html[data-ready=true]")
    ui.page.wait_for_selector(".msg.assistant:has-text('beta answer')")
    assert ui.page.inner_text("#convo-title") == "Renamed B"
    assert ui.page.locator(f'.session-item[data-id="{a}"]').count() == 1
    ui.page.click(f'.session-item[data-id="{a}"] .session-open')
    ui.page.wait_for_selector(".msg.user:has-text('alpha question')")
    ui.shot("sessions")


def test_settings_change_the_request(ui, server):
    ui.open(server.url)
    ui.page.click("#settings-btn")
    ui.page.fill("#max_tokens-num", "1")  # below the slider's 128: the number box allows it
    ui.page.fill("#stop-seqs", "END\n###")
    ui.page.fill("#system-prompt", "You are terse.")
    ui.page.press("#system-prompt", "Tab")
    ui.shot("settings-request")
    ui.page.click("#settings-close")
    ui.send(PARIS)
    request = json.loads([f for f in ui.sent if f.startswith("{")][-1])
    assert request["max-token"] == 1 and request["stop"] == ["END", "###"]
    assert request["system-prompt"] == "You are terse."
    assert ui.page.inner_text("#stat-tokens") == "1"
    end = json.loads([f for f in ui.received if f.startswith("__END__:")][-1][len("__END__:") :])
    assert end["usage"]["completion_tokens"] == 1 and end["finish_reason"] == "length"
    stored = requests.get(f"{server.url}/api/sessions/{current_session(ui)}", timeout=10).json()
    assert stored["system_prompt"] == "You are terse."
    # settings are remembered by the browser
    ui.page.reload()
    ui.page.wait_for_selector("html[data-ready=true]")
    assert ui.page.input_value("#max_tokens-num") == "1"


def test_export_downloads_the_conversation(ui, server):
    sid = seed_session(
        server.url,
        "Export me",
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi **there**"}],
    )
    ui.open(server.url)
    ui.page.click(f'.session-item[data-id="{sid}"] .session-open')
    ui.page.wait_for_selector(".msg.assistant strong:has-text('there')")
    with ui.page.expect_download() as dl:
        ui.page.click("#export-md")
    assert dl.value.suggested_filename == "ortllm-export-me.md"
    text = Path(dl.value.path()).read_text()
    assert (
        text.startswith("# Export me")
        and "## User\n\nSay hi" in text
        and "## Assistant\n\nHi **there**" in text
    )
    with ui.page.expect_download() as dl:
        ui.page.click("#export-json")
    data = json.loads(Path(dl.value.path()).read_text())
    assert data["id"] == sid and data["title"] == "Export me" and data["model"] == DEFAULT_MODEL
    assert data["messages"] == [
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "Hi **there**"},
    ]


def test_model_output_is_sanitised_and_code_is_highlighted(ui, server):
    hostile = (
        "<img src=x onerror=alert(1)>\n\n<script>alert(2)</script>\n\n[click](javascript:alert(3))\n\n"
        '<a href="#" onclick="alert(4)">x</a> ![pixel](http://example.invalid/p.png)\n\n'
        "```python\ndef hello():\n    return 'world'\n```\n"
    )
    sid = seed_session(
        server.url,
        "Hostile",
        [
            {"role": "user", "content": "<b>bold?</b><img src=y onerror=alert(5)>"},
            {"role": "assistant", "content": hostile},
        ],
    )
    ui.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    ui.open(server.url)
    ui.page.click(f'.session-item[data-id="{sid}"] .session-open')
    ui.page.wait_for_selector(".msg.assistant .code-block")
    messages = ui.page.locator("#messages")
    assert messages.locator("img").count() == 0
    assert messages.locator("script").count() == 0
    assert messages.locator("b").count() == 0
    assert messages.locator("[onclick], [onerror]").count() == 0
    assert messages.locator("a[href^='javascript']").count() == 0
    answer = ui.page.inner_text(".msg.assistant .content")
    assert "<img src=x onerror=alert(1)>" in answer and "<script>alert(2)</script>" in answer
    assert "<b>bold?</b>" in ui.page.inner_text(".msg.user .content")
    # highlighted code with its copy button
    assert ui.page.locator(".code-block code.hljs .hljs-keyword").count() >= 1
    assert ui.page.inner_text(".code-block .code-lang") == "python"
    ui.page.click(".code-block .copy-btn")
    ui.page.wait_for_selector(".code-block .copy-btn:has-text('Copied')")
    assert "def hello():" in ui.page.evaluate("navigator.clipboard.readText()")
    ui.shot("sanitised-code")
    ui.page.wait_for_timeout(300)
    assert ui.dialogs == []


# ---- connection, auth, accessibility ------------------------------------------------------------


def test_status_goes_offline_when_the_server_stops_and_recovers(ui, pulled):
    live = LiveServer("--model", DEFAULT_MODEL)
    try:
        ui.open(live.url)
        assert ui.page.inner_text("#conn-text") == "connected"
        live.stop()
        ui.page.wait_for_selector("#conn[data-state=offline]", timeout=30_000)
        assert ui.page.inner_text("#conn-text") == "offline"
        ui.shot("offline")
        live = LiveServer("--model", DEFAULT_MODEL, port=live.port)
        ui.page.wait_for_selector("#conn[data-state=connected][data-mode=ws]", timeout=30_000)
        ui.setting("temperature", 0)
        ui.send(PARIS)  # the reconnected socket streams again
        assert "Paris" in ui.answers()[-1]
    finally:
        ui.page.goto("about:blank")  # close the socket first: the server then stops at once
        live.stop()


def test_asks_for_the_api_key_when_the_server_requires_one(ui, pulled):
    live = LiveServer("--api-key", "ui-test-key-123")
    try:
        ui.open(live.url, connected=False)
        ui.page.wait_for_selector("#key-dialog[open]")
        assert "requires an API key" in ui.page.inner_text("#key-reason")
        ui.shot("api-key")
        ui.page.fill("#key-input", "ui-test-key-123")
        ui.page.click("#key-save")
        ui.page.wait_for_selector("#model-select option[value='smollm2-135m']", state="attached")
        ui.page.wait_for_selector("#conn[data-state=connected][data-mode=ws]")  # ?token= on the socket
        assert ui.page.evaluate("localStorage.getItem('ortllm.apiKey')") == "ui-test-key-123"
        assert ui.page.is_hidden("#banner")
    finally:
        ui.page.goto("about:blank")  # close the socket first: the server then stops at once
        live.stop()


CONTRAST = """() => {
    const rgb = c => (c.match(/[\\d.]+/g) || []).slice(0, 3).map(Number);
    const lum = ([r, g, b]) => [r, g, b].map(v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; })
                                        .reduce((a, v, i) => a + v * [0.2126, 0.7152, 0.0722][i], 0);
    const ratio = (a, b) => { const [x, y] = [lum(rgb(a)), lum(rgb(b))].sort((p, q) => q - p); return (x + 0.05) / (y + 0.05); };
    const bg = el => { for (; el; el = el.parentElement) { const c = getComputedStyle(el).backgroundColor;
                       if (!/rgba\\(.*, 0\\)$/.test(c) && c !== 'transparent') return c; } return 'rgb(255,255,255)'; };
    const out = {};
    for (const sel of ['body', '.brand-sub', '.side-title', '.session-meta', '#send-btn', '.stats', '#conn-text',
                       '.msg.user .content', '.msg.assistant .content', '.msg-actions .btn', '.hint', '.field-inline label']) {
        const el = document.querySelector(sel);
        if (el) out[sel] = ratio(getComputedStyle(el).color, bg(el));
    }
    return out;
}"""


@pytest.mark.parametrize("theme", ["dark", "light"])
def test_accessible_labels_focus_order_and_contrast(browser, server, theme):
    ui = Page(browser, theme)
    try:
        sid = seed_session(
            server.url,
            "Contrast",
            [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}],
        )
        ui.open(server.url)
        ui.page.click(f'.session-item[data-id="{sid}"] .session-open')
        ui.page.wait_for_selector(".msg.assistant .msg-actions .btn")
        ui.page.click("#settings-btn")
        assert ui.page.get_attribute("html", "data-theme") == theme
        unlabeled = ui.page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
            .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim())
            .map(el => el.outerHTML.slice(0, 80))""")
        assert unlabeled == []
        ratios = ui.page.evaluate(CONTRAST)
        low = {k: round(v, 2) for k, v in ratios.items() if v < 4.5}
        assert len(ratios) >= 10 and not low, low
        ui.shot(f"settings-{theme}")
        # keyboard: the composer has focus on load; Tab from the top reaches the skip link first
        ui.page.reload()
        ui.page.wait_for_selector("html[data-ready=true]")
        assert ui.page.evaluate("document.activeElement.id") == "composer-input"
        # Tab follows the visual order: top bar, conversations, conversation, composer, settings
        ui.page.click("#settings-btn")
        ui.page.focus(".skip-link")
        order: list[str] = []
        while len(order) < 400 and (not order or order[-1] != "skip-link"):
            ui.page.keyboard.press("Tab")
            order.append(ui.page.evaluate("document.activeElement.id || document.activeElement.className"))
        expected = [
            "model-select",
            "key-btn",
            "theme-btn",
            "settings-btn",
            "new-chat",
            "session-open",
            "export-md",
            "export-json",
            "composer-input",
            "send-btn",
            "settings-close",
            "temperature-range",
        ]
        positions = [order.index(name) for name in expected]
        assert positions == sorted(positions), order
        ui.page.focus(".skip-link")
        ui.page.keyboard.press("Enter")
        assert ui.page.evaluate("location.hash") == "#composer-input"
    finally:
        ui.close()


# ---- from first run to daily use (issue 20) --------------------------------------------------------


def test_the_sidebar_lists_the_ui_conversations_not_api_sessions(ui, server):
    mine = seed_session(
        server.url,
        "Made in the UI",
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    )
    empty = requests.post(f"{server.url}/api/sessions", json={"model": DEFAULT_MODEL}, timeout=10).json()[
        "id"
    ]
    r = requests.post(
        f"{server.url}/api/chat",
        json={
            "model": DEFAULT_MODEL,
            "messages": [{"role": "user", "content": "Name a fruit.\nJust one."}],
            "stream": False,
            "options": {"max_tokens": 8, "temperature": 0},
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    by_api = r.json()["session_id"]
    ui.open(server.url)
    ui.page.wait_for_selector(f'.session-item[data-id="{mine}"]')
    listed = ui.page.eval_on_selector_all(".session-item", "els => els.map(e => e.dataset.id)")
    assert mine in listed and by_api not in listed and empty not in listed
    ui.shot("sidebar-ui-only")
    # API sessions on request: titled from their first question, never the empty ones
    ui.page.check("#show-api")
    item = ui.page.wait_for_selector(f'.session-item[data-id="{by_api}"]')
    assert item.inner_text().splitlines() == ["Name a fruit.", f"2 messages · {DEFAULT_MODEL} · API"]
    assert ui.page.locator(f'.session-item[data-id="{empty}"]').count() == 0
    ui.shot("sidebar-with-api")
    ui.page.reload()  # the choice is remembered
    ui.page.wait_for_selector(f'.session-item[data-id="{by_api}"]')
    ui.page.uncheck("#show-api")
    ui.page.wait_for_selector(f'.session-item[data-id="{by_api}"]', state="detached")


def test_a_stopped_turn_survives_a_reload(ui, server):
    ui.open(server.url)
    ui.setting("max_tokens", 2048)
    ui.setting("temperature", 0.8)
    question = "Write a very long story about a dragon who learns to cook, with many chapters."
    ui.send(question, wait=False)
    ui.page.wait_for_function(
        "() => (document.querySelector('.msg.assistant .content')?.textContent || '').length > 40"
    )
    ui.page.click("#stop-btn")
    ui.wait_answer(1, timeout=15_000)
    partial = ui.answers()[-1]
    sid = current_session(ui)
    item = f'.session-item[data-id="{sid}"] .session-meta'
    ui.page.wait_for_selector(f"{item}:has-text('2 messages')")
    stored = requests.get(f"{server.url}/api/sessions/{sid}", timeout=10).json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"] and stored[0]["content"] == question
    assert stored[1]["stopped"] is True and stored[1]["content"].strip()
    ui.page.reload()
    ui.page.wait_for_selector("html[data-ready=true]")
    ui.page.wait_for_selector(".msg.assistant .msg-note:has-text('Stopped.')")
    assert ui.page.inner_text(".msg.user .content") == question
    assert ui.answers() == [partial]
    assert ui.page.inner_text(item).startswith("2 messages")
    assert ui.page.locator(".msg").count() == 2
    ui.shot("stopped-after-reload")
    # the next question continues the conversation with the stopped turn in it
    ui.setting("max_tokens", 8)
    ui.send("Thanks.")
    assert len(server_messages(server.url, sid)) == 4
    assert ui.page.locator(".msg-note:has-text('Stopped.')").count() == 1


def test_a_lone_trailing_fence_renders_no_empty_code_block(ui, server):
    sid = seed_session(
        server.url,
        "Fences",
        [
            {"role": "user", "content": "code?"},
            {"role": "assistant", "content": "Here it is:\n\n```"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "Sure:\n```python\n"},
            {"role": "user", "content": "real code"},
            {"role": "assistant", "content": "```python\nprint(1)\n```\nDone.\n```"},
        ],
    )
    ui.open(server.url)
    ui.page.click(f'.session-item[data-id="{sid}"] .session-open')
    ui.page.wait_for_selector(".msg.assistant .code-block")
    answers = ui.page.locator(".msg.assistant")
    assert answers.nth(0).locator(".code-block, pre").count() == 0
    assert answers.nth(0).locator(".content").inner_text().strip() == "Here it is:"
    assert answers.nth(1).locator(".code-block, pre").count() == 0
    assert answers.nth(2).locator(".code-block").count() == 1  # a real block keeps its Copy button
    assert answers.nth(2).locator(".copy-btn").count() == 1
    assert answers.nth(2).locator(".content").inner_text().strip().endswith("Done.")
    ui.shot("lone-fence")


LONG_MODEL = "qwen2.5-coder-1.5b-instruct-q4-k-m"
# how much of each element's text does not fit: select (option text) and textarea (placeholder)
CLIPPED = """() => {
    const clipped = (el, text) => {
        const style = getComputedStyle(el);
        const ctx = document.createElement('canvas').getContext('2d');
        ctx.font = `${style.fontWeight} ${style.fontSize} ${style.fontFamily}`;
        const room = el.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
        return Math.max(0, ctx.measureText(text).width - room);
    };
    const select = document.getElementById('model-select');
    const input = document.getElementById('composer-input');
    const bar = document.querySelector('.topbar').getBoundingClientRect();
    const rows = new Set([...document.querySelectorAll('.topbar > *')]
        .filter(e => e.offsetParent !== null && e.getBoundingClientRect().height > 0)
        .map(e => Math.round(e.getBoundingClientRect().top / 10)));
    return {
        select: clipped(select, select.selectedOptions[0].text + '    '),
        placeholder: clipped(input, input.placeholder),
        overflow: document.documentElement.scrollWidth - innerWidth,
        height: bar.height,
        rows: rows.size,
    };
}"""


def test_model_names_are_whole_and_the_header_fits_a_phone(browser, server, home):
    alias = home / "models" / LONG_MODEL
    alias.symlink_to(home / "models" / DEFAULT_MODEL, target_is_directory=True)
    ui = Page(browser)
    try:
        ui.open(server.url)
        ui.page.select_option("#model-select", LONG_MODEL)
        wide = ui.page.evaluate(CLIPPED)
        assert wide["select"] == 0 and wide["placeholder"] == 0 and wide["overflow"] <= 0, wide
        cut = ui.page.eval_on_selector_all(
            ".session-item .session-meta",
            "els => els.filter(e => e.scrollWidth > e.clientWidth).length",
        )
        assert cut == 0  # "N messages · model" whole in the sidebar
        ui.shot("header-wide")
        ui.page.set_viewport_size({"width": 390, "height": 844})
        ui.page.wait_for_timeout(300)  # the sidebar slides away
        narrow = ui.page.evaluate(CLIPPED)
        assert narrow["placeholder"] == 0 and narrow["overflow"] <= 0, narrow
        assert narrow["height"] <= 2 * 54 + 2, narrow  # one or two rows of the top bar
        ui.shot("header-390")
        ui.page.select_option("#model-select", DEFAULT_MODEL)
        assert ui.page.evaluate(CLIPPED)["select"] == 0
    finally:
        ui.close()
        alias.unlink()
