"""Errors of google.api_core and the Pub/Sub SDK: which are retried, and how the rest are translated.

Every one leaves the Pub/Sub modules as one of :mod:`MessageBroker.errors` (``raise … from exc``).
"""

from __future__ import annotations

from google.api_core import exceptions as api_errors
from google.api_core import retry as api_retry

from MessageBroker.errors import (
    AuthenticationError, BrokerConnectionError, BrokerError, PublishError, TopicNotFoundError,
)

_TRANSIENT = (api_errors.ServiceUnavailable, api_errors.DeadlineExceeded, api_errors.Aborted,
              api_errors.InternalServerError, api_errors.Unknown, api_errors.ResourceExhausted)


def retry_policy(timeout: float) -> api_retry.Retry:
    """Retry transient errors with exponential backoff for at most ``timeout`` seconds."""
    return api_retry.Retry(predicate=api_retry.if_exception_type(*_TRANSIENT), initial=0.1, maximum=2.0,
                           multiplier=2.0, timeout=timeout)


def unwrap(error: BaseException) -> BaseException:
    """The error a RetryError gave up on, else ``error`` itself."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(error, api_errors.RetryError) and cause is not None else error


def describe(error: BaseException) -> str:
    """Type and message of an api_core error, for logs and error texts."""
    return f"{type(error).__name__}: {getattr(error, 'message', None) or error}"


def translate(error: BaseException, topic: str, default: type[BrokerError], doing: str) -> BrokerError:
    """Map a google.api_core or SDK error onto the broker API's error tree."""
    error = unwrap(error)
    if isinstance(error, BrokerError):
        return error
    detail = f"{doing}: {describe(error)}"
    if isinstance(error, api_errors.NotFound):
        return TopicNotFoundError(topic, detail)
    if isinstance(error, api_errors.Unauthenticated | api_errors.PermissionDenied):
        return AuthenticationError(detail)
    if isinstance(error, api_errors.ServiceUnavailable | api_errors.DeadlineExceeded) and default is not PublishError:
        return BrokerConnectionError(detail)
    return default(detail)
