"""The model server: this project's engine behind an OpenAI-compatible API, as a Ray Serve application.

    python -m bot.serve            # Ray on this machine, the app on SERVE_HOST:SERVE_PORT, until Ctrl-C
    serve run serve.yaml           # or `serve deploy serve.yaml` on a running Ray cluster (bot.serve:app_builder)

The bot never imports this package (nor Ray); `requirements-serve.txt` installs what it needs.
"""

from bot.serve.app import APP_NAME, DEPLOYMENT_NAME, ChatEngine, app_builder, build_app
from bot.serve.run import main

__all__ = ["APP_NAME", "DEPLOYMENT_NAME", "ChatEngine", "app_builder", "build_app", "main"]
