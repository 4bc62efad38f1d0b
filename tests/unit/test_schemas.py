import pytest
from pydantic import ValidationError

from graph.schemas import GenerationRequest, parse_size

SIZE_CASES = [
    pytest.param("256x256", (256, 256), id="square"),
    pytest.param("512x256", (512, 256), id="wide"),
    pytest.param(" 64X128 ", (64, 128), id="case_and_space"),
]
BAD_SIZES = [
    pytest.param("300x300", "multiple of 64", id="not_multiple"),
    pytest.param("0x256", "between 64 and 2048", id="zero"),
    pytest.param("4096x64", "between 64 and 2048", id="too_big"),
    pytest.param("256", "WIDTHxHEIGHT", id="no_x"),
    pytest.param("axb", "WIDTHxHEIGHT", id="letters"),
]


@pytest.mark.parametrize("size,expected", SIZE_CASES)
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size,fragment", BAD_SIZES)
def test_bad_size_names_the_rule(size, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_size(size)


def test_defaults_and_extras_are_reported():
    req = GenerationRequest.model_validate({"prompt": "a cat", "output_format": "png"})
    assert (req.n, req.size, req.quality, req.user_tier, req.response_format) == (1, "256x256", "standard", "free",
                                                                                   "b64_json")
    assert req.ignored_fields == ["output_format"]


BAD_FIELDS = [
    pytest.param({"prompt": ""}, "prompt", id="empty_prompt"),
    pytest.param({"prompt": "x" * 4001}, "prompt", id="long_prompt"),
    pytest.param({"prompt": "x", "n": 5}, "n", id="n_over"),
    pytest.param({"prompt": "x", "n": 0}, "n", id="n_under"),
    pytest.param({"prompt": "x", "quality": "ultra"}, "quality", id="quality"),
    pytest.param({"prompt": "x", "user_tier": "gold"}, "user_tier", id="user_tier"),
    pytest.param({"prompt": "x", "seed": -1}, "seed", id="seed"),
    pytest.param({"prompt": "x", "intent": "video"}, "intent", id="intent"),
    pytest.param({"prompt": "x", "text": ""}, "text", id="empty_text"),
]


@pytest.mark.parametrize("body,field", BAD_FIELDS)
def test_bad_fields_fail_on_that_field(body, field):
    with pytest.raises(ValidationError) as e:
        GenerationRequest.model_validate(body)
    assert [err["loc"][0] for err in e.value.errors()] == [field]
