"""Entry point: `python app.py` serves the gateway with gevent on $PORT (default 5000)."""

from gevent import monkey

monkey.patch_all()  # before anything else imports socket, ssl or threading

import logging  # noqa: E402
import sys  # noqa: E402

from gateway.app import create_app  # noqa: E402
from gateway.config import load  # noqa: E402
from gateway.errors import ConfigError  # noqa: E402
from gateway.server import serve  # noqa: E402


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(create_app(config=load()))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
