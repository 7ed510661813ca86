"""What the four entry scripts share: common options, logging set-up and clean error exits."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

# TensorFlow's C++ start-up chatter is noise for users of the scripts.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def setup_logging(level: str = "INFO") -> None:
    """Log lines with time, process and logger name to stderr."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(processName)s[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    # librdkafka and grpc retries are logged by our handlers in summary form.
    for noisy in ("google.api_core", "google.cloud.pubsub_v1", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def script_parser(description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A script's parser with what every stage takes: broker choice, pipeline settings, log level."""
    from MessageBroker.message_broker_factory import add_broker_arguments

    parser = argparse.ArgumentParser(description=description, epilog=epilog)
    add_broker_arguments(parser)
    parser.add_argument("--config", metavar="INI", help="pipeline settings (default: Pipeline/pipeline_config.ini)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="console log level (default: INFO)")
    return parser


def run(main: Callable[[], int]) -> None:
    """Run a script's main; expected failures print one clear line instead of a traceback."""
    from DB.errors import DBError
    from MessageBroker.errors import BrokerError
    from Modelling.errors import ModellingError
    from Pipeline.config import PipelineConfigError
    from Queue.errors import QueueError

    try:
        code = main()
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except (BrokerError, PipelineConfigError, QueueError, DBError, ModellingError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = EXIT_ERROR
    sys.exit(code)
