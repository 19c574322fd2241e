"""The schema: migrations applied in order, once, one upgrade at a time."""

from __future__ import annotations

from pipeline.store.postgres.boundary import translate
from pipeline.store.postgres.connection import Connections
from pipeline.store.postgres.sqltext import migrations

# Taken for the whole of `db upgrade`, so concurrent upgrades run one after another.
_MIGRATION_LOCK_KEY = 0x70697065  # "pipe"


class Schema(Connections):
    """`upgrade` and `schema_version`."""

    def upgrade(self) -> list[str]:
        """Apply the migrations not yet applied; safe to run from several processes at once."""
        applied_now: list[str] = []
        with translate(self.url), self._using(), self._session_engine.connect() as conn:
            conn = conn.execution_options(isolation_level="READ COMMITTED")
            with conn.begin():
                conn.execute(self._q["migration_lock"], {"key": _MIGRATION_LOCK_KEY})
                conn.execute(self._q["schema_version_table"])
                done = set(conn.execute(self._q["applied_versions"]).scalars())
                driver = conn.connection.driver_connection
                assert driver is not None
                for version, name, script in migrations():
                    if version in done:
                        continue
                    driver.execute(script)  # no parameters: several statements allowed
                    conn.execute(self._q["record_version"], {"version": version, "name": name})
                    applied_now.append(name)
        return applied_now

    def schema_version(self) -> int | None:
        with translate(self.url), self._using(), self._session_engine.connect() as conn:
            if not conn.execute(self._q["schema_exists"]).scalar():
                return None
            version = conn.execute(self._q["schema_version"]).scalar()
            return None if version is None else int(version)
