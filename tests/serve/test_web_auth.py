"""`vlmkit web --auth-file`: Gradio's login page in front of the chat, and the file's checks."""

import socket

import httpx
import pytest

pytest.importorskip("gradio", reason="the serve extra is not installed (pip install -e '.[serve]')")

from vlmkit.errors import ConfigError  # noqa: E402
from vlmkit.serve.web import launch, read_logins  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_page_asks_for_a_login_from_the_file(loaded, tmp_path):
    logins = tmp_path / "logins"
    logins.write_text("# who may use the page\nada:lovelace\n\nalan:turing\n")
    assert read_logins(logins) == [("ada", "lovelace"), ("alan", "turing")]
    model, processor = loaded
    ui, url = launch("tiny", model, processor, port=free_port(), block=False, logins=read_logins(logins))
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/config").status_code == 401  # nothing of the app without a login
            assert client.post("/login", data={"username": "ada", "password": "babbage"}).status_code >= 400
            assert client.post("/login", data={"username": "ada", "password": "lovelace"}).status_code == 200
            assert client.get("/config").status_code == 200  # the session cookie now opens it
    finally:
        ui.close()


@pytest.mark.parametrize("text, problem", [("", "holds no USER:PASSWORD"), ("ada\n", "line 1: expected USER:PASSWORD"),
                                           ("# x\nada:\n", "line 2: expected USER:PASSWORD")])
def test_a_bad_login_file_is_refused_naming_the_line(tmp_path, text, problem):
    path = tmp_path / "logins"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        read_logins(path)
    with pytest.raises(ConfigError, match="cannot read it"):
        read_logins(tmp_path / "missing")
