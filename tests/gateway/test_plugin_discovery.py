"""Plugins are found through the ``sluice.plugins`` entry-point group: the built-ins and a
third-party package alike. SLUICE_PLUGINS restricts what loads; a broken plugin is
skipped and logged, never fatal."""

from __future__ import annotations

import logging
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from sluice.gateway.backends.registry import build_backend, discover
from sluice.gateway.settings import BackendConfig, Settings, SettingsError
from tests.conftest import GatewayServer, echo_settings

BUILT_INS = {"echo", "local", "openai_upstream"}

# A third-party backend as a user would ship it: its own module, its own distribution
# (dist-info with an entry_points.txt), nothing of it inside sluice.
ACME_MODULE = '''
from sluice.gateway.backends.contract import (
    Backend, BackendOptions, GenerationEvent, ModelCard, Usage)


class AcmeBackend(Backend):
    """Answers every prompt with the prompt reversed."""

    name = "acme"

    class Options(BackendOptions):
        model: str = "acme-1"

    def models(self):
        return [ModelCard(self.options.model, owned_by="acme")]

    def count_tokens(self, request):
        return len(self._prompt(request).split())

    async def generate(self, request):
        text = self._prompt(request)[::-1]
        yield GenerationEvent(text=text, tokens=len(text.split()))
        yield GenerationEvent(finish_reason="stop",
                              usage=Usage(self.count_tokens(request), len(text.split())))

    @staticmethod
    def _prompt(request):
        if request.prompt is not None:
            return request.prompt
        return request.messages[-1].content


class NotABackend:
    pass
'''


@pytest.fixture
def acme_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Install the acme distribution on sys.path (as pip would into site-packages)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "acme_sluice.py").write_text(ACME_MODULE)
    dist = site / "acme_sluice-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-sluice\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""\
        [sluice.plugins]
        acme = acme_sluice:AcmeBackend
        acme_broken = acme_sluice_missing:Backend
        acme_wrong = acme_sluice:NotABackend
        """))
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("acme_sluice", None)


def test_built_ins_are_registered_as_entry_points() -> None:
    found = discover()
    assert BUILT_INS <= set(found)
    assert found["echo"].__module__ == "sluice.plugins.echo"


def test_a_third_party_backend_is_found_like_the_built_ins(
        acme_installed: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="sluice.plugins"):
        found = discover()
    assert BUILT_INS | {"acme"} <= set(found)
    assert found["acme"].__module__ == "acme_sluice"
    # The broken and the wrong one are skipped, each with one log line, not an exception.
    assert "acme_broken" not in found and "acme_wrong" not in found
    assert any("acme_broken" in r.getMessage() and "failed to load" in r.getMessage()
               for r in caplog.records)
    assert any("acme_wrong" in r.getMessage() and "not a Backend" in r.getMessage()
               for r in caplog.records)
    backend = build_backend("a", BackendConfig(plugin="acme", options={"model": "acme-2"}),
                            found)
    assert [c.id for c in backend.models()] == ["acme-2"]


def test_sluice_plugins_restricts_what_loads(acme_installed: Path, tmp_path: Path) -> None:
    settings = Settings.from_env(env={"SLUICE_PLUGINS": "acme,echo",
                                      "SLUICE_DATA_DIR": str(tmp_path / "data")})
    assert settings.plugins == ("acme", "echo")
    assert set(discover(settings.plugins)) == {"acme", "echo"}
    # A backend whose plugin is not allowed is a configuration error, naming what is.
    with pytest.raises(SettingsError, match=r"unknown plugin 'local' \(installed: acme, echo\)"):
        build_backend("local", BackendConfig(plugin="local"), discover(settings.plugins))


def test_a_third_party_backend_serves_through_the_gateway(acme_installed: Path,
                                                          sqlite_url: str) -> None:
    settings = echo_settings(sqlite_url, plugins=("acme",),
                             backends={"acme": BackendConfig(plugin="acme")})
    server = GatewayServer(settings).start()
    try:
        client = OpenAI(base_url=server.base_url + "/v1", api_key=server.tenant_key())
        assert [m.id for m in client.models.list().data] == ["acme-1"]
        reply = client.chat.completions.create(
            model="acme-1", messages=[{"role": "user", "content": "one two three"}])
        assert reply.choices[0].message.content == "eerht owt eno"
        assert reply.usage is not None and reply.usage.prompt_tokens == 3
    finally:
        server.stop()
