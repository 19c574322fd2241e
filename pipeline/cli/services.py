"""What the commands use, built once per command line: the database and broker URLs (private
servers started where a URL is unset), the store, the Celery app, a sender, and the
environment of the processes a command starts.

Nothing here writes `os.environ`: a process the command starts (a worker, Flower, psql) gets
the URLs through `child_env()`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

from pipeline import errors, masking, settings, tracing
from pipeline.cli import local
from pipeline.sender import Sender
from pipeline.store import Store, open_store


class Services:
    """Built lazily, each part on first use; `close()` lets go of what was opened."""

    def __init__(self, *, notify: Callable[[str], None] | None = None) -> None:
        self._urls: dict[str, str] = {}
        #: the private servers started by this command, by the setting they stand in for
        self.started: dict[str, str] = {}
        self._notify = notify
        self._store: Store | None = None
        self._app: Any = None

    # -- where the services are -----------------------------------------------------------

    def use_database_url(self, url: str) -> None:
        """This database instead of PIPELINE_DATABASE_URL (before the store is opened)."""
        assert self._store is None, "the store is open already"
        self._urls[settings.DATABASE_URL.name] = url

    def database_url(self) -> str:
        return self._url(settings.DATABASE_URL, local.start_postgres)

    def broker_url(self) -> str:
        return self._url(settings.BROKER_URL, local.start_redis)

    def _url(self, setting: settings.Setting[str | None], start: Callable[[], str]) -> str:
        url = self._urls.get(setting.name) or setting.get()
        if not url:
            try:
                url = start()
            # The private servers fail in their own ways (no `local` extra, a state folder that
            # cannot be written, pg_ctl or redis-server not starting): one clear message.
            except Exception as error:
                raise errors.PipelineError(
                    f"could not start the private servers under {local.state_dir()}: {error}"
                ) from error
            self.started[setting.name] = url
            if self._notify is not None:
                self._notify(
                    f"{setting.name} not set: using private servers under "
                    f"{local.state_dir()} ({masking.mask_url(url)})"
                )
        self._urls[setting.name] = url
        return url

    def secrets(self) -> tuple[str | None, ...]:
        """The URLs whose passwords must never be printed."""
        return (
            self._urls.get(settings.DATABASE_URL.name) or settings.DATABASE_URL.get(),
            self._urls.get(settings.BROKER_URL.name) or settings.BROKER_URL.get(),
        )

    # -- what the commands use ------------------------------------------------------------

    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.database_url())
        return self._store

    def app(self) -> Any:
        """pipeline's Celery app, pointed at the broker (once, here): the same app whose tasks
        the workers run, so names and routing agree."""
        if self._app is None:
            # Importing Celery costs a light command (`status`, `db`) more than its query.
            from pipeline.worker.celery_app import app

            url = self.broker_url()
            app.conf.broker_url = url
            _check_broker_url(app, url)
            self._app = app
        return self._app

    def sender(self) -> Sender:
        """A new sender on the broker (the caller closes it); with PIPELINE_TRACING on, each
        file sent starts its trace here."""
        tracing.setup("pipeline-cli")
        return Sender(self.app())

    def check_broker(self) -> None:
        """Say now, before rows are registered, when the broker cannot be reached."""
        self.sender().close()

    def child_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a process this command starts: this one's, with the URLs it
        uses (private servers included)."""
        return {**os.environ, **self._urls, **(extra or {})}

    def close(self) -> None:
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.close()
            self._store = None


def _check_broker_url(app: Any, url: str) -> None:
    """A malformed broker URL is said so now, masked, not as a traceback mid-submit."""
    try:
        # kombu parses the URL (scheme, host, port) when the connection is made, not sent.
        app.connection_for_write().as_uri()
    except Exception as error:
        raise errors.InvalidInput(
            f"invalid broker URL {masking.mask_invalid_url(url)}: {masking.scrub(str(error), url)}"
        ) from error
