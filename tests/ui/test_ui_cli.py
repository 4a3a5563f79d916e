"""`sdtune ui` on the command line: lazy gradio, loopback by default, a warning for other hosts, --auth."""
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from sdtune.commands import cli


def test_without_gradio_it_is_one_line_naming_the_extra(tmp_path):
    code = ("import sys; sys.modules['gradio'] = None; from sdtune.commands.cli import main; "
            f"sys.exit(main(['ui', '--outputs', {str(tmp_path)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "sdtune: error: the web UI needs gradio, which is not installed; install the extra: pip install -e '.[ui]'"]


def test_help_does_not_import_gradio_or_torch():
    code = ("import sys; from sdtune.commands.cli import build_parser; build_parser(); "
            "print('gradio' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.fixture
def fake_launch(monkeypatch):
    pytest.importorskip("gradio")
    import sdtune.ui.app as app

    calls = []
    monkeypatch.setattr(app, "launch", lambda state, **kw: calls.append(kw))
    monkeypatch.setattr(app, "wait_for_interrupt", lambda: None)  # the real one waits for Ctrl-C
    return calls


def test_binds_loopback_by_default_and_never_shares(fake_launch, tmp_path, capsys):
    assert cli.main(["ui", "--outputs", str(tmp_path / "o")]) == 0
    assert fake_launch[0]["host"] == "127.0.0.1" and fake_launch[0]["auth"] is None
    assert "warning" not in capsys.readouterr().err


def test_another_host_warns_and_auth_is_passed(fake_launch, tmp_path, capsys):
    assert cli.main(["ui", "--host", "0.0.0.0", "--outputs", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "sdtune: warning: --host 0.0.0.0 exposes the UI to the network" in err and "--auth" in err
    assert cli.main(["ui", "--host", "0.0.0.0", "--auth", "me:pw", "--outputs", str(tmp_path / "o")]) == 0
    assert fake_launch[-1]["auth"] == ("me", "pw")


@pytest.mark.parametrize("auth", ["nopassword", ":pw", "me:"])
def test_a_malformed_auth_is_one_line(fake_launch, tmp_path, capsys, auth):
    assert cli.main(["ui", "--auth", auth, "--outputs", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == "sdtune: error: --auth must be USER:PASS (both non-empty)"
    assert not fake_launch


def test_the_real_server_asks_for_the_password_and_makes_no_share_link(tmp_path):
    pytest.importorskip("gradio")
    from sdtune.ui.app import launch, make_state

    state = make_state(tmp_path / "o")
    demo, url = launch(state, host="127.0.0.1", port=None, auth=("me", "pw"), block=False, quiet=True)
    try:
        assert url.startswith("http://127.0.0.1:") and demo.share_url is None and demo.share is False
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(url + "config", timeout=10)
        assert denied.value.code == 401
        data = "username=me&password=wrong".encode()
        with pytest.raises(urllib.error.HTTPError) as wrong:
            urllib.request.urlopen(urllib.request.Request(url + "login", data=data), timeout=10)
        assert wrong.value.code == 400
        ok = urllib.request.urlopen(urllib.request.Request(url + "login", data=b"username=me&password=pw"), timeout=10)
        assert json.loads(ok.read())["success"] is True
    finally:
        demo.close()


def test_the_server_refuses_an_upload_over_the_limit(tmp_path):
    pytest.importorskip("gradio")
    import httpx

    from sdtune.ui.app import launch, make_state
    from sdtune.ui.safety import MAX_UPLOAD_BYTES

    demo, url = launch(make_state(tmp_path / "o"), host="127.0.0.1", port=None, block=False, quiet=True)
    try:
        big = {"files": ("big.png", b"\x89PNG" + b"0" * (MAX_UPLOAD_BYTES + 1), "image/png")}
        refused = httpx.post(url + "gradio_api/upload", files=big, timeout=30)
        assert refused.status_code == 413, refused.text[:200]
        small = {"files": ("small.png", b"\x89PNG" + b"0" * 100, "image/png")}
        assert httpx.post(url + "gradio_api/upload", files=small, timeout=30).status_code == 200
    finally:
        demo.close()


# `sdtune ui` with faulthandler on SIGUSR1: a run that does not stop shows where each thread is.
UI_DRIVER = ("import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR1, all_threads=True); "
             "from sdtune.commands.cli import main; sys.exit(main(sys.argv[1:]))")


def _start_ui(tmp_path, port, ignore_sigint: bool = False):
    import os
    import signal

    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    # ignore_sigint: as a shell without job control starts `cmd &` (SIGINT ignored, and inherited as ignored).
    return subprocess.Popen([sys.executable, "-c", UI_DRIVER, "ui", "--port", str(port), "--outputs",
                             str(tmp_path / "o")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None)


def _wait_until_served(proc, port) -> str:
    end = time.time() + 60
    while True:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
        except (urllib.error.URLError, ConnectionError):
            assert proc.poll() is None and time.time() < end, proc.communicate(timeout=5)
            time.sleep(0.5)


def _ctrl_c(proc, seen_err: str = "", signum=None) -> tuple[str, str]:
    """Send SIGINT (or ``signum``); the process must end within 30 s, else the test fails with its threads'
    stacks and its signal masks (/proc: what it ignores and blocks)."""
    import signal
    from pathlib import Path

    proc.send_signal(signal.SIGINT if signum is None else signum)
    try:
        out, err = proc.communicate(timeout=30)
        return out, seen_err + err
    except subprocess.TimeoutExpired:
        status = Path(f"/proc/{proc.pid}/status")
        masks = [ln for ln in status.read_text().splitlines() if ln.startswith("Sig")] if status.exists() else []
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        proc.kill()
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"sdtune ui still running 30 s after Ctrl-C; {masks}; stderr:\n{seen_err}{err}")


def test_sdtune_ui_serves_the_page_and_stops_on_ctrl_c(tmp_path):
    pytest.importorskip("gradio")
    port = _free_port()
    proc = _start_ui(tmp_path, port)
    try:
        assert "gradio" in _wait_until_served(proc, port).lower()
    finally:
        out, err = _ctrl_c(proc)
    assert f"sdtune: note: web UI on http://127.0.0.1:{port}" in err
    assert proc.returncode == 0 and "Traceback" not in err, err


@pytest.mark.parametrize("how", ["SIGINT, started with SIGINT ignored", "SIGTERM"])
def test_the_ui_stops_on_sigint_even_if_started_ignoring_it_and_on_sigterm(tmp_path, how):
    """A script's `sdtune ui &` inherits SIGINT ignored; a supervisor stops with SIGTERM: both stop it cleanly."""
    pytest.importorskip("gradio")
    import signal

    port = _free_port()
    proc = _start_ui(tmp_path, port, ignore_sigint=how.startswith("SIGINT"))
    try:
        _wait_until_served(proc, port)
    finally:
        out, err = _ctrl_c(proc, signum=signal.SIGINT if how.startswith("SIGINT") else signal.SIGTERM)
    assert proc.returncode == 0 and "Traceback" not in err, err


def test_ctrl_c_while_the_ui_is_still_starting_stops_it(tmp_path):
    """A Ctrl-C that lands while gradio is starting (not yet waiting) stops the server as well."""
    pytest.importorskip("gradio")
    proc = _start_ui(tmp_path, _free_port())
    first = ""
    try:
        first = proc.stderr.readline()  # printed right before the server starts
        assert "sdtune: note: web UI on" in first, first
        time.sleep(1.0)  # somewhere inside gradio's start
    finally:
        out, err = _ctrl_c(proc, first)
    assert proc.returncode == 0 and "Traceback" not in err, err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_server_connects_to_nothing_but_itself(tmp_path, monkeypatch):
    """Every name looked up and every address connected to while the UI starts and serves: loopback only
    (no analytics, version check, share tunnel or CDN)."""
    pytest.importorskip("gradio")
    import socket

    import httpx

    from sdtune.ui.app import launch, make_state

    seen = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        seen.append(address[0] if isinstance(address, tuple) else address)
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        seen.append(host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    demo, url = launch(make_state(tmp_path / "o"), host="127.0.0.1", port=None, block=False, quiet=True)
    try:
        assert httpx.get(url, timeout=10).status_code == 200
        assert httpx.get(url + "config", timeout=10).status_code == 200
        time.sleep(1.0)  # what a launch starts in the background has had its chance
    finally:
        demo.close()
    hosts = {str(h) for h in seen}
    assert hosts and hosts <= {"127.0.0.1", "localhost", "::1"}, hosts
