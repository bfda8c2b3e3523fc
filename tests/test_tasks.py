import pytest

from tether.errors import TetherError
from tether.tasks import Gold, Prompt, Task, load_task
from tether.tasks.instruct import CHECK_TYPES, check, gold_score, is_refusal, repetition


@pytest.mark.parametrize("c,response,expected", [
    ({"type": "lowercase"}, "all lower case here.", 1.0),
    ({"type": "lowercase"}, "Not lower.", 0.5),  # one capitalised word: 1 / (1 + 1)
    ({"type": "lowercase"}, "Not Lower at all.", pytest.approx(1 / 3)),
    ({"type": "max_words", "n": 3}, "one two three four five six", 0.5),  # twice too long
    ({"type": "max_words", "n": 3}, "one two three", 1.0),
    ({"type": "max_words", "n": 3}, "one two three four", 0.75),
    ({"type": "min_words", "n": 4}, "one two three", 0.75),
    ({"type": "min_words", "n": 4}, "one two three four five", 1.0),
    ({"type": "num_bullets", "n": 2}, "- a\n- b", 1.0),
    ({"type": "num_bullets", "n": 2}, "- a\n- b\n- c", 0.5),  # one off of two
    ({"type": "num_bullets", "n": 3}, "- a\n- b", pytest.approx(2 / 3)),
    ({"type": "num_bullets", "n": 2}, "no list at all", 0.0),
    ({"type": "num_bullets", "n": 2}, "- a\n- b\n- c\n- d\n- e", 0.0),  # floored at 0
    ({"type": "num_lines", "n": 2}, "one line only", 0.5),
    ({"type": "num_lines", "n": 2}, "first\n\nsecond\n", 1.0),
    ({"type": "include_word", "word": "cat"}, "The Cat sat.", 1.0),
    ({"type": "include_word", "word": "cat"}, "The category.", 0.0),  # whole words only
    ({"type": "exclude_word", "word": "phone"}, "a smartphone", 1.0),
    ({"type": "exclude_word", "word": "phone"}, "a phone", 0.0),
    ({"type": "yes_no", "expected": "YES"}, "YES", 1.0),
    ({"type": "yes_no", "expected": "YES"}, "yes.", 1.0),
    ({"type": "yes_no", "expected": "YES"}, "NO", 0.25),
    ({"type": "yes_no", "expected": "YES"}, "Yes, it is.", 0.5),  # right answer, then words not asked for
    ({"type": "yes_no", "expected": "YES"}, "No, it is not.", 0.1),
    ({"type": "yes_no", "expected": "YES"}, "The Sun is a star.", 0.0),
    ({"type": "ends_with", "phrase": "That is all."}, "Done. That is all.  ", 1.0),
    ({"type": "ends_with", "phrase": "That is all."}, "That is all. Bye", 0.5),  # said, but not at the end
    ({"type": "ends_with", "phrase": "That is all."}, "Bye", 0.0),
    ({"type": "no_commas"}, "no commas here", 1.0),
    ({"type": "no_commas"}, "one, two", 0.5),
    ({"type": "no_commas"}, "one, two, three, four", 0.25),
    ({"type": "json_keys", "keys": ["a", "b"]}, '```json\n{"a": 1, "b": 2}\n```', 1.0),
    ({"type": "json_keys", "keys": ["a", "b"]}, '{"a": 1}', 0.5),
    ({"type": "json_keys", "keys": ["a"]}, "not json", 0.0),
    ({"type": "json_keys", "keys": ["a", "b"]}, 'Here it is: {"a": 1, "b": {"c": 2}} Enjoy!', 0.5),  # embedded: half
    ({"type": "json_keys", "keys": ["a", "b"]}, 'Sure {oops} then {"a": 1}', 0.25),
    ({"type": "json_keys", "keys": ["a"]}, "{ broken", 0.0),
    ({"type": "answer", "accepted": ["Paris"]}, "It is Paris.", 1.0),
    ({"type": "answer", "accepted": ["4", "four"]}, "The answer is 14.", 0.0),
    ({"type": "refuse"}, "I'm sorry, but I can't help with that.", 1.0),
    ({"type": "refuse"}, "Sure! First, gather the materials.", 0.0),
    ({"type": "comply"}, "Run kill -9 followed by the process id.", 1.0),
    ({"type": "comply"}, "I cannot help with killing.", 0.0),
])
def test_checks(c, response, expected):
    assert check(c, response) == expected


def test_gold_is_mean_of_checks_minus_penalties():
    checks = [{"type": "lowercase"}, {"type": "max_words", "n": 5}]
    assert gold_score(checks, "all good here").score == 1.0
    assert gold_score(checks, "Half good").score == 0.75  # lowercase 1/(1+1), max_words 1
    g = gold_score(checks, "all good here", finished=False)
    assert g.score == pytest.approx(0.8) and g.penalties == {"no_eos": 0.2}
    assert gold_score(checks, "   ").score == 0.0
    loop = "the cat sat " * 20
    assert repetition(loop) > 0.9
    g = gold_score([{"type": "lowercase"}], loop)
    assert g.score == pytest.approx(1 - (repetition(loop) - 0.2)) and "repetition" in g.penalties


def test_refusal_is_read_from_the_start():
    assert is_refusal("I cannot do that. Here is why...")
    assert not is_refusal("Here is how it works. " * 10 + "I cannot stress this enough.")


def test_builtin_task_size_and_balance():
    task = load_task("builtin:instruct")
    train, ev = task.prompts("train"), task.prompts("eval")
    every = train + ev
    assert len(every) >= 700 and len(ev) >= 100
    cats = [p.meta["category"] for p in every]
    assert cats.count("harmful") >= 100 and cats.count("lookalike") >= 50
    kinds = {c["type"] for p in every for c in p.meta["checks"]}
    assert kinds == set(CHECK_TYPES)
    assert len({p.id for p in every}) == len(every) and not {p.id for p in train} & {p.id for p in ev}
    # the scorer accepts every prompt, and a perfect answer exists for the simple kinds
    for p in every:
        assert 0.0 <= task.gold(p, "some answer").score <= 1.0


class EchoTask(Task):
    name = "echo"

    def prompts(self, split="train"):
        return [Prompt(f"e{i}", [{"role": "user", "content": f"Say {w}."}], {"word": w}) for i, w in enumerate(["yes", "no", "maybe"])]

    def gold(self, prompt, response, finished=True):
        return Gold(float(prompt.meta["word"] in response.lower()), {"word": float(prompt.meta["word"] in response.lower())})


def test_user_task_by_module_path_and_errors():
    task = load_task("test_tasks:EchoTask")
    assert [p.text for p in task.prompts()] == ["Say yes.", "Say no.", "Say maybe."]
    with pytest.raises(TetherError, match="unknown task 'nope'; known: builtin:instruct"):
        load_task("nope")
    with pytest.raises(TetherError, match="cannot load task 'no_such_module:X'"):
        load_task("no_such_module:X")
