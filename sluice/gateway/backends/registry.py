"""Plugin discovery (entry-point group ``sluice.plugins``) and the model -> backend registry."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import entry_points

from pydantic import ValidationError

from sluice.gateway.backends.contract import Backend, ModelCard
from sluice.gateway.backends.config import BackendConfig
from sluice.gateway.errors import SettingsError

log = logging.getLogger("sluice.plugins")

GROUP = "sluice.plugins"


def discover(allowed: tuple[str, ...] | None = None) -> dict[str, type[Backend]]:
    """Installed plugins by name. ``allowed`` (SLUICE_PLUGINS) restricts what loads."""
    found: dict[str, type[Backend]] = {}
    for ep in entry_points(group=GROUP):
        if allowed is not None and ep.name not in allowed:
            continue
        try:
            cls = ep.load()
        except Exception as exc:  # a broken third-party plugin must not stop the gateway
            log.error("plugin %s (%s) failed to load: %s", ep.name, ep.value, exc)
            continue
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            log.error("plugin %s (%s) is not a Backend subclass", ep.name, ep.value)
            continue
        found[ep.name] = cls
    return found


def build_backend(name: str, config: BackendConfig, plugins: dict[str, type[Backend]],
                  device: str | None = None) -> Backend:
    """The backend of ``config``; on ``device`` (its ``device`` option) for a data-parallel pool."""
    cls = plugins.get(config.plugin)
    if cls is None:
        known = ", ".join(sorted(plugins)) or "none"
        raise SettingsError(
            f"backend '{name}': unknown plugin '{config.plugin}' (installed: {known})"
        )
    if device is not None and "device" not in cls.Options.model_fields:
        raise SettingsError(f"backend '{name}': pool.devices needs a plugin with a device option "
                            f"('{config.plugin}' has none)")
    try:
        options = cls.Options.model_validate(config.options | ({"device": device} if device else {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise SettingsError(f"backend '{name}' option {where}: {err['msg']}") from None
    return cls(options)


@dataclass(frozen=True, slots=True)
class Route:
    backend_name: str
    card: ModelCard


class ModelRegistry:
    """Model name -> the backends that serve it. A model may have several backends only
    when a routing group names it (``grouped``); otherwise a second one is a config error."""

    def __init__(self, grouped: frozenset[str] = frozenset()) -> None:
        self._routes: dict[str, list[Route]] = {}
        self._grouped = grouped
        self._hidden: set[str] = set()
        self._hidden: set[str] = set()

    def add(self, backend_name: str, backend: Backend) -> None:
        for card in backend.models():
            routes = self._routes.setdefault(card.id, [])
            if routes and card.id not in self._grouped:
                raise SettingsError(
                    f"model '{card.id}' is served by both backend '{routes[0].backend_name}' "
                    f"and '{backend_name}' (name both in a [groups.\"{card.id}\"] section to "
                    "balance between them)"
                )
            routes.append(Route(backend_name, card))

    def get(self, model: str) -> Route | None:
        routes = self._routes.get(model)
        return routes[0] if routes else None

    def routes(self, model: str) -> list[Route]:
        return list(self._routes.get(model, ()))

    def hide(self, model: str) -> None:
        """Keep `model` (the guard model) from tenants: listed and callable only by keys
        scoped to it."""
        self._hidden.add(model)

    def visible(self, model: str, scopes: frozenset[str] | None) -> bool:
        """Whether a key with these model scopes (None: any model) may see `model`."""
        return model in scopes if scopes is not None else model not in self._hidden

    def cards(self) -> list[ModelCard]:
        return [routes[0].card for routes in self._routes.values()]
