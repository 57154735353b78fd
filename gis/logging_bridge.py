"""Bridge from the plugin's Python logger to the QGIS message log."""

import logging

from qgis.core import Qgis, QgsMessageLog

from ..core import LOGGER_NAME

MESSAGE_LOG_TAG = "Lookalike"

_QGIS_LEVELS = (
    (logging.ERROR, Qgis.MessageLevel.Critical),
    (logging.WARNING, Qgis.MessageLevel.Warning),
    (logging.INFO, Qgis.MessageLevel.Info),
)


class QgsMessageLogHandler(logging.Handler):
    """Logging handler that writes records to the QGIS message log under the plugin's tag.

    ``QgsMessageLog.logMessage`` is thread-safe, so records from ``QgsTask`` worker threads
    can go through this handler directly.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            level = next((qgis_level for python_level, qgis_level in _QGIS_LEVELS
                          if record.levelno >= python_level), Qgis.MessageLevel.Info)
            QgsMessageLog.logMessage(message, MESSAGE_LOG_TAG, level, notifyUser=False)
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging.Handler contract: report, never raise
            self.handleError(record)


def install_message_log_handler() -> QgsMessageLogHandler:
    """Attach one message-log handler to the plugin logger and return it for later removal."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        if isinstance(handler, QgsMessageLogHandler):
            logger.removeHandler(handler)
    handler = QgsMessageLogHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    # The QGIS message log is the plugin's log sink; the root logger stays untouched.
    logger.propagate = False
    return handler


def remove_message_log_handler(handler: QgsMessageLogHandler) -> None:
    """Detach a handler added by :func:`install_message_log_handler`."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.removeHandler(handler)
    logger.propagate = True
