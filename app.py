"""Entry point: `python app.py` serves the gateway with gevent on $PORT (default 5000), in
server.workers processes (default $WEB_CONCURRENCY, else 1; see gateway/workers.py)."""

from gevent import monkey

monkey.patch_all()  # before anything else imports socket, ssl or threading

import logging  # noqa: E402
import sys  # noqa: E402

from gateway.app import create_app  # noqa: E402
from gateway.config import load  # noqa: E402
from gateway.errors import ConfigError  # noqa: E402
from gateway.server import serve  # noqa: E402
from gateway.workers import CONFIG_ERROR_EXIT, Supervisor, is_worker, worker_count  # noqa: E402


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load()
        count = worker_count(config)
        if count > 1 and not is_worker():
            # The parent: it binds and supervises, and builds no app (no threads, no hub).
            sys.exit(Supervisor(config, count).run())
        serve(create_app(config=config))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT)


if __name__ == "__main__":
    main()
