import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcloud.core.errors import InvalidInput
from meshcloud.core.names import NAME_MAX_LEN, is_valid_name, validate_name

VALID = ["a", "rack-1", "tile-cache", "voip2", "a" * NAME_MAX_LEN, "x-y-z", "db0-1"]

HOSTILE = [
    ("", "empty"),
    ("a" * (NAME_MAX_LEN + 1), "characters long"),
    ("it's", '"\'"'),
    ('say"hi', "'\"'"),
    ("<script>", "'<'"),
    ("a<b", "'<'"),
    ("a&b", "'&'"),
    ("a/b", "'/'"),
    ("..", "'.'"),
    ("a..b", "'.'"),
    ("../etc", "'.'"),
    ("a b", "' '"),
    ("a\nb", "U+000A"),
    ("a\x00b", "U+0000"),
    ("a\x1b[31m", "U+001B"),
    ("\u0430pp", "CYRILLIC SMALL LETTER A"),  # Cyrillic 'a' look-alike
    ("rack\u2010one", "HYPHEN"),  # Unicode hyphen look-alike
    ("\uff52\uff41\uff43\uff4b", "FULLWIDTH"),  # fullwidth "rack"
    ("Rack", "'R'"),
    ("1rack", "start with a lowercase letter"),
    ("-rack", "start with a lowercase letter"),
    ("rack-", "end with '-'"),
    ("ra--ck", "'--'"),
    ("a;rm -rf", "';'"),
    ("$(id)", "'$'"),
    ("a`b`", "'`'"),
    ("a\\b", "'\\\\'"),
    ("a%2fb", "'%'"),
]


@pytest.mark.parametrize("name", VALID)
def test_valid_names_pass(name: str) -> None:
    assert validate_name("rack", name) == name
    assert is_valid_name(name)


@pytest.mark.parametrize(("name", "reason"), HOSTILE)
def test_hostile_names_are_refused_with_a_reason(name: str, reason: str) -> None:
    with pytest.raises(InvalidInput) as info:
        validate_name("appliance", name)
    message = str(info.value)
    assert message.startswith("appliance name ")
    assert reason in message
    assert not is_valid_name(name)


@pytest.mark.parametrize("value", [None, 3, b"rack", ["rack"]])
def test_non_strings_are_refused(value: object) -> None:
    with pytest.raises(InvalidInput, match="must be a string"):
        validate_name("rack", value)


def test_message_does_not_echo_a_huge_value() -> None:
    with pytest.raises(InvalidInput) as info:
        validate_name("rack", "a" * 10_000)
    assert len(str(info.value)) < 300


@given(st.text(alphabet="ab-z09\n.A\u0430 ", max_size=70))
def test_fast_path_agrees_with_the_character_checks(value: str) -> None:
    ok = is_valid_name(value)
    assert ok == (
        0 < len(value) <= NAME_MAX_LEN
        and value[0] in "abz"
        and all(c in "abz09-" for c in value)
        and not value.endswith("-")
        and "--" not in value
    )
    if ok:
        assert validate_name("rack", value) == value
    else:
        with pytest.raises(InvalidInput):
            validate_name("rack", value)


@pytest.mark.parametrize("value", ["rack\n", "rack\r\n", "a" * 63 + "\n"])
def test_trailing_newline_is_refused(value: str) -> None:
    assert not is_valid_name(value)
    with pytest.raises(InvalidInput, match=r"U\+000A|U\+000D|characters long"):
        validate_name("rack", value)
