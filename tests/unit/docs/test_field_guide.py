"""The field guide names every status the console shows, in each language.

The statuses come from the console's own JavaScript and message catalogs
(meshcloud.fieldguide.console_statuses), never from a list kept here: a
status added to the console without a line in the guide fails this test.
"""

import re

import pytest

from meshcloud import fieldguide as fg


def guide_text(lang: str) -> str:
    return "\n".join(md for _, md in fg.guide_sources(lang))


def test_the_console_statuses_are_found() -> None:
    keys = [s.key for s in fg.console_statuses()]
    # each kind of place the console shows a status in yields some
    for prefix in ("rack_", "app_", "att_", "sev_", "state_", "level_"):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert "conn_lost" in keys and "all_well" in keys


@pytest.mark.parametrize("lang", fg.LANGUAGES)
def test_the_guide_names_every_console_status(lang: str) -> None:
    missing = fg.missing_statuses(guide_text(lang), fg.console_statuses(), lang)
    texts = {s.key: s.texts[lang] for s in fg.console_statuses()}
    assert not missing, f"field-guide/{lang} does not name: " + "; ".join(
        f"{k} ({texts[k]!r})" for k in missing
    )


@pytest.mark.parametrize("lang", fg.LANGUAGES)
def test_the_status_page_shows_every_console_icon(lang: str) -> None:
    status_page = dict(fg.guide_sources(lang))["status"]
    levels = fg.icon_levels()
    assert set(levels) >= {"ok", "warn", "bad", "unknown"}
    for level in levels:
        assert f"figures/icon-{level}.svg" in status_page, level


@pytest.mark.parametrize("lang", fg.LANGUAGES)
def test_every_page_has_a_title_and_its_figures_exist(lang: str, tmp_path) -> None:
    pages = fg.guide_sources(lang)
    assert [name for name, _ in pages] == fg.page_names()
    wanted = []
    for _, md in pages:
        assert fg.page_title(md)
        wanted += fg.figures_in(md)
    assert any(w.endswith(".png") for w in wanted) and any(w.endswith(".svg") for w in wanted)
    fg.prepare_figures(tmp_path, wanted)
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(set(wanted))


# -- the check itself, on a console that grows a status ------------------------------

JS = """
function rackModel(doc) {
  let level, words;
  if (hl.state === "lost") [level, words] = ["bad", t("rack_lost")];
  else if (power.on_battery) [level, words] = ["warn", t("rack_on_battery", { left: fmt(x) })];
  else [level, words] = ["ok", t("rack_alive")];
}
function other() {
  const label = t("nav_racks");
  items.push({ level: "bad", text: t("att_rack_lost", { rack: r.name }), href: "#/racks" });
  h("li", {}, badge(SEVERITY_LEVEL[e.severity] || "ok", t(`sev_${e.severity}`)));
  field(t("power"), p ? t(`power_${p.source}`) : "—");
  const headline = items.length ? tn("att_count", items.length) : t("all_well");
}
"""
CATALOG = {
    "rack_lost": "Lost",
    "rack_on_battery": "On battery, {left} left",
    "rack_alive": "Alive",
    "nav_racks": "Racks",
    "att_rack_lost": "Rack {rack} is lost",
    "sev_info": "Info",
    "sev_critical": "Critical",
    "power": "Power",
    "power_mains": "On mains",
    "power_nut": "From the UPS",
    "att_count_one": "1 thing needs attention",
    "att_count_other": "{n} things need attention",
    "all_well": "All is well",
}


def statuses() -> list[fg.ConsoleStatus]:
    keys = fg.console_status_keys([JS], CATALOG)
    return [fg.ConsoleStatus(k, {"en": CATALOG[k], "fr": CATALOG[k]}) for k in keys]


def test_status_sites_in_the_console_source_are_read() -> None:
    expected = "rack_lost rack_on_battery rack_alive att_rack_lost sev_info sev_critical"
    expected += " power_mains power_nut att_count_one att_count_other all_well"
    # not nav_racks (a menu), not power (a field's label)
    assert [s.key for s in statuses()] == sorted(expected.split())


def test_a_new_status_without_guide_text_fails() -> None:
    guide = """
    Racks show **Alive** or **Lost**. **Rack r2 is lost**: go and look. Events are
    **Info** or **Critical**. Power: **On mains** or **From the UPS**. The Overview
    says **All is well**, **1 thing needs attention** or **3 things need attention**.
    """
    assert fg.missing_statuses(guide, statuses(), "en") == ["rack_on_battery"]
    guide += "A rack on battery says **On battery, 9 min left**."
    assert fg.missing_statuses(guide, statuses(), "en") == []


def test_a_placeholder_stands_for_a_word_or_two_not_for_anything() -> None:
    status = fg.ConsoleStatus("x", {"en": "Rack {rack} is lost (silent for {age})"})
    assert status.pattern("en").search(fg.normalise("Rack **r2** is lost (silent for 12 s)"))
    assert not status.pattern("en").search("Rack r2 is fine. Another is lost (silent for 3 s)")


def test_a_status_key_missing_from_the_catalog_is_an_error() -> None:
    with pytest.raises(fg.FieldGuideError, match="rack_gone"):
        fg.console_status_keys(['[level, words] = ["bad", t("rack_gone")];'], CATALOG)


def test_quotes_and_spaces_are_normalised() -> None:
    status = fg.ConsoleStatus("x", {"fr": "En attente d\u2019une baie"})
    assert status.pattern("fr").search(fg.normalise("**En attente\nd'une baie**"))
    assert re.search("a b", fg.normalise("a\u00a0**b**"))
