"""``sdtune ui``: the web UI (Generate, Train, Runs, Inspect) in the browser, on the embedded family by default."""
from __future__ import annotations

import argparse
import sys

EPILOG = """\
install: pip install -e '.[ui]'   (gradio; nothing is downloaded at run time)

safety:
  Binds 127.0.0.1 (this machine only). --host 0.0.0.0 exposes it to the network: protect it with --auth.
  No public share links. The UI reads and writes only the outputs folder (--outputs) and reads the shipped
  data and the folders named with --allow; '..' in any path is refused; uploads are limited to 10 MB and
  must decode as images.

examples:
  sdtune ui
  sdtune ui --port 7861 --outputs outputs --allow ~/photos/dog
  sdtune ui --host 0.0.0.0 --auth me:secret
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ui", help="the web UI: generate and train from the browser",
        description="A local web UI over the same engine and training recipe as the command line.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--auth", metavar="USER:PASS", help="require this user name and password")
    p.add_argument("--outputs", default="outputs", help="the folder runs and images go to (default outputs/)")
    p.add_argument("--allow", action="append", default=[], metavar="DIR",
                   help="another folder the UI may read (training images, models); repeatable")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default fp16 on GPU, fp32 on CPU")
    p.set_defaults(func=run)
    return p


def parse_auth(text: str | None):
    from sdtune.errors import SdtuneError

    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise SdtuneError("--auth must be USER:PASS (both non-empty)")
    return user, password


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args) -> int:
    from sdtune.errors import SdtuneError

    try:
        import gradio as gr
    except ImportError:
        raise SdtuneError("the web UI needs gradio, which is not installed; install the extra: pip install -e '.[ui]'") \
            from None
    if args.port is not None and not 0 < args.port < 65536:
        raise SdtuneError(f"--port must be 1-65535, got {args.port}")
    auth = parse_auth(args.auth)
    from sdtune.ui.app import LOOPBACK, launch, make_state, wait_for_interrupt

    if args.host not in LOOPBACK:
        print(f"sdtune: warning: --host {args.host} exposes the UI to the network: anyone who reaches it can generate, "
              f"train and read {args.outputs}" + ("" if auth else "; protect it with --auth USER:PASS"),
              file=sys.stderr)
    state = make_state(args.outputs, args.allow, device=args.device, dtype=args.dtype)
    print(f"sdtune: note: web UI on http://{args.host}:{args.port} (outputs in {state.sandbox.outputs}); Ctrl-C stops it",
          file=sys.stderr)
    import signal

    # Started from a script with `&`, a shell leaves SIGINT ignored, and Python then installs no handler for it:
    # Ctrl-C or `kill -INT` would never stop the server (seen when CI was started that way). So the handler is
    # set here, and SIGTERM stops the UI the same way: the training runs it started stop with a checkpoint
    # rather than being left behind. The wait is ours, not gradio's, so that an interrupt that lands while
    # gradio is still starting closes its server too.
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        launch(state, host=args.host, port=args.port, auth=auth, block=False, quiet=True)
        wait_for_interrupt()
    except KeyboardInterrupt:
        pass
    finally:
        state.trainer.shutdown()
        gr.close_all()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0
