"""``dynasyn ui``: start the web app (Gradio; ``pip install -e ".[ui]"``)."""

from __future__ import annotations

import argparse
import importlib.util
import signal

from dynasyn.errors import InputError

EXAMPLES = """examples:
  dynasyn ui                                   # http://127.0.0.1:7860, bundled micro model
  dynasyn ui --runs-dir ~/dynasyn-runs --port 8080
  dynasyn ui --model stabilityai/stable-diffusion-2-1-base --device cuda

Binds 127.0.0.1 (this machine only) unless --host says otherwise; --share (a public Gradio
link) is never on by default. Every run the page makes or opens is a folder directly under
--runs-dir. Flow, screenshots and security choices: docs/ui.md.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``dynasyn ui``."""
    p = sub.add_parser("ui", help="the web app: scene, masks, augmentation, training, "
                       "generation and evaluation in a browser (Gradio)", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="micro",
                   help="diffusers SD or SDXL pipeline: local dir, hub id, or micro (bundled, default)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--runs-dir", default="runs",
                   help="folder holding every run the UI makes or opens (default runs/)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, mps")
    p.add_argument("--share", action="store_true",
                   help="also open a public *.gradio.live link (off by default; needs network)")


def launch(args: argparse.Namespace, block: bool = True):
    """Build the page and serve it; returns the Gradio app (``block=False``: in the background)."""
    if importlib.util.find_spec("gradio") is None:
        raise InputError('dynasyn ui needs Gradio: pip install -e ".[ui]" (or pip install '
                         '"gradio>=6,<7")')
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be 1..65535 (got {args.port})")
    from dynasyn.ui.app import build_app, theme
    from dynasyn.ui.callbacks import Studio
    from dynasyn.ui.uploads import MAX_UPLOAD_MB

    studio = Studio(args.runs_dir, model=args.model, device=args.device)
    if block:  # `kill` stops the server like Ctrl-C: jobs cancelled, temporary files removed
        signal.signal(signal.SIGTERM, _interrupt)
    app = build_app(studio)
    app.queue(default_concurrency_limit=1)
    print(f"dynasyn ui: runs in {studio.runs.root}, model {args.model}", flush=True)
    try:
        app.launch(server_name=args.host, server_port=args.port, share=args.share,
                   max_file_size=f"{MAX_UPLOAD_MB}mb", allowed_paths=[str(studio.runs.root),
                                                                      str(studio.tmp)],
                   theme=theme(), ssr_mode=False, footer_links=[], quiet=False,
                   prevent_thread_lock=not block, mcp_server=False)
    except OSError as e:
        studio.close()
        raise InputError(f"cannot serve on {args.host}:{args.port} ({e}); pick another "
                         "--port") from None
    if block:
        studio.close()
    return app


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """``dynasyn ui``."""
    launch(args)
    return 0
