"""Errors of the simulator's settings, named so the command can say which flag is wrong."""

from __future__ import annotations

from swarmnet.errors import ConfigError


class SettingError(ConfigError):
    """A value of one setting out of range: "<name> <detail>". ``setting`` is the
    :class:`~swarmnet.sim.engine.EngineConfig` field, so that ``swarmnet simulate`` can put its
    flag in place of the name (:meth:`naming`)."""

    def __init__(self, setting: str, name: str, detail: str) -> None:
        super().__init__(f"{name} {detail}")
        self.setting = setting
        self.detail = detail

    def naming(self, flag: str) -> str:
        return f"{flag} {self.detail}"
