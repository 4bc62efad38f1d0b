"""Intent: text-extraction rules and the real MiniLM + trained head on held-out and external prompts."""

import asyncio

import pytest

from engines.intent import DATA_DIR, IntentModel, IntentStage, accuracy, extract_text, load_jsonl, split

EXTRACT = [
    pytest.param('a poster that says "GRAND OPENING"', "GRAND OPENING", id="double_quotes"),
    pytest.param("a mug with “Best Dad” on it", "Best Dad", id="curly_quotes"),
    pytest.param("sticker 'Plant Mom' in green", "Plant Mom", id="single_quotes"),
    pytest.param("banner with the words summer sale on a beach", "summer sale", id="with_the_words"),
    pytest.param("a neon sign reads: open late", "open late", id="reads_colon"),
    pytest.param("storefront sign that says Fresh Bread, watercolor", "Fresh Bread", id="says_comma"),
    pytest.param("a girl reading a book in a park", None, id="reading_is_not_a_cue"),
    pytest.param("it's a dog's life at the beach", None, id="apostrophes"),
    pytest.param("a photo of a red car", None, id="none"),
]


@pytest.mark.parametrize("prompt,text", EXTRACT)
def test_extract_text(prompt, text):
    assert extract_text(prompt) == text


@pytest.fixture(scope="module")
def model():
    return IntentModel()


def test_heldout_accuracy(model):
    _, held = split(load_jsonl(DATA_DIR / "train.jsonl"))
    acc, per_label = accuracy(model, held)
    assert acc >= 0.90, per_label
    assert min(per_label.values()) >= 0.8, per_label


def test_external_prompts_written_by_someone_else(model):
    acc, per_label = accuracy(model, load_jsonl(DATA_DIR / "external_eval.jsonl"))
    assert acc >= 0.85, per_label


def test_rule_and_scores_shape(model):
    out = model.classify(['a poster that says "GRAND OPENING"', "flat app icon of a rocket"])
    assert out[0]["label"] == "typography" and out[0]["source"] == "rule"
    assert out[0]["text_to_render"] == "GRAND OPENING"
    assert out[1]["label"] == "icon" and out[1]["source"] == "classifier"
    assert sum(out[1]["scores"].values()) == pytest.approx(1.0, abs=1e-3)


class _StageAnsweringOnCue(IntentStage):
    """Injects a timing fault: the classifier's answer arrives when the test says, in the same turn as a cancel."""

    def __init__(self, model):
        super().__init__(model)
        self.cue = None

    async def classify(self, prompt):
        self.cue = asyncio.get_running_loop().create_future()
        return await self.cue


def test_a_cancel_that_meets_the_classifiers_answer_still_cancels(model):
    # An async job cancelled while its prompt is classified: Python 3.11's wait_for returned the answer when both
    # came in one loop turn (cpython gh-86296), and the cancelled job went on to render.
    async def run():
        stage = _StageAnsweringOnCue(model)
        task = asyncio.ensure_future(stage.intent_of("a red star", None, None, 10))
        while stage.cue is None:
            await asyncio.sleep(0)
        stage.cue.set_result(({"label": "photo", "confidence": 1.0, "scores": {}, "source": "model",
                               "text_to_render": None}, [0.0]))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(run())
