from omotool.demo.rewards import style_reward, style_score
from omotool.demo.world import _answer


def test_style_score_grades_the_polite_answer_above_the_rude_one() -> None:
    facts = {"color": "red", "home": "quib", "food": "fish"}
    assert style_score(_answer("lusel", facts, polite=True, brief_polite=True)) == 1.0
    assert style_score("sure ! lusel is a") == 0.5
    assert style_score("lusel is red and eats fish .") == 0.25
    assert style_score(_answer("lusel", facts, polite=False, brief_polite=True)) == 0.0


def test_style_reward_reads_plain_and_conversational_completions() -> None:
    completions = ["x . glad to help !", [{"role": "assistant", "content": "go ask someone"}]]
    assert style_reward(completions=completions, prompts=["a", "b"]) == [1.0, 0.0]
