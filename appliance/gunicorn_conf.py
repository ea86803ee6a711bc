"""Production gunicorn settings for the control plane.

    gunicorn -c python:appliance.gunicorn_conf 'appliance.app:create_app()'

Every value can be overridden with GUNICORN_CMD_ARGS or the ANIMUS_* variables below.
"""

import multiprocessing
import os

bind = os.environ.get("ANIMUS_BIND", "127.0.0.1:8080")
# Sync workers with threads: uploads stream through a worker without buffering the body.
worker_class = "gthread"
workers = int(os.environ.get("ANIMUS_WORKERS", min(4, multiprocessing.cpu_count() + 1)))
threads = int(os.environ.get("ANIMUS_THREADS", "8"))
# Long uploads and downloads must not be cut off by the worker timeout.
timeout = int(os.environ.get("ANIMUS_WORKER_TIMEOUT", "3600"))
graceful_timeout = 30
keepalive = 5
# Our own JSON access log is written by the app; gunicorn's would duplicate it.
accesslog = None
errorlog = "-"
forwarded_allow_ips = os.environ.get("ANIMUS_FORWARDED_ALLOW_IPS", "127.0.0.1")
limit_request_line = 8190
