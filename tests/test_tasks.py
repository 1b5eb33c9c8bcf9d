
import polars as pl
import pytest
from conftest import FIXTURES
from conftest import REPO as ROOT

from kaggle_pipeline.data.chat_template import Turn
from kaggle_pipeline.data.records import read_tarr
from kaggle_pipeline.data.tasks import (
    TASK_NAMES,
    Example,
    TaskSpec,
    TemplateError,
    build_examples,
    get_task,
    load_records,
    template_fields,
    train_validation_split,
)

TARR = ROOT / "data" / "tarr"

def sentiment_prompt(comment: str) -> str:
    return f"리뷰: {comment}\n이 리뷰는 긍정인가요 부정인가요?"


def examples(task: TaskSpec, path, **options) -> list[Example]:
    labelled = options.pop("labelled", True)
    frame = load_records(task, path, labelled=labelled).frame
    return build_examples(task, frame, with_answers=labelled, **options)


def user(text: str) -> Turn:
    return Turn("user", text)


def model(text: str) -> Turn:
    return Turn("model", text)


# ----------------------------------------------------------------------------- registry


def test_built_in_tasks():
    assert TASK_NAMES == ("tarr-sentiment", "dolly-en-ko", "aihub-dialogue", "aihub-parallel",
                          "aihub-summarization", "aihub-qa")
    for name in TASK_NAMES:
        assert get_task(name).name == name
    default = get_task()
    assert default.name == "tarr-sentiment"
    assert default.kind == "classification"
    assert default.label_map == {1: "긍정", 0: "부정"}
    assert default.id_column == "id"
    assert default.output_columns == ("id", "comment", "label")
    assert default.stratify_column == "label"
    assert get_task("dolly-en-ko").stratify_column is None


def test_unknown_task_lists_the_built_in_ones():
    with pytest.raises(ValueError) as err:
        get_task("nsmc")
    assert str(err.value) == ("unknown task 'nsmc'; built-in tasks: tarr-sentiment, dolly-en-ko, "
                              "aihub-dialogue, aihub-parallel, aihub-summarization, aihub-qa")


# ----------------------------------------------------------------------------- sentiment


def test_tarr_fixture_conversations():
    assert examples(get_task(), FIXTURES / "tarr_train.tsv") == [
        Example(0, [user(sentiment_prompt("국물이 진하고 면이 쫄깃해요 ㄹㅇ 맛집👍")),
                    model("긍정")], 1),
        Example(1, [user(sentiment_prompt('"웨이팅 1시간" 실화냐... 맛은 그냥 그럼')),
                    model("부정")], 0),
        Example(2, [user(sentiment_prompt("사장님 친절하시고 가격도 착해요ㅋㅋ")),
                    model("긍정")], 1),
        Example(3, [user(sentiment_prompt("ㅁㅊ 이 가격에 이 양? 다시는 안 감")),
                    model("부정")], 0),
    ]


def test_tarr_test_file_gives_prompts_only():
    got = examples(get_task(), FIXTURES / "tarr_test.tsv", labelled=False)
    assert got == [Example(1, [user(sentiment_prompt("분위기 좋고 디저트도 맛있어요"))]),
                   Example(2, [user(sentiment_prompt('"최악" 그 자체'))])]
    assert got[0].prompt == got[0].conversation
    assert got[0].answer is None


def test_real_tarr_train_answers_follow_the_labels():
    task = get_task()
    got = examples(task, TARR / "train.tsv")
    frame = read_tarr(TARR / "train.tsv").frame
    assert len(got) == 300
    assert [e.answer for e in got] == [task.label_map[label] for label in frame["label"]]
    assert [e.label for e in got] == frame["label"].to_list()
    assert got[5].prompt == [user(sentiment_prompt(frame["comment"][5]))]


def test_english_label_words():
    task = get_task(label_map={1: "positive", 0: "negative"})
    got = examples(task, FIXTURES / "tarr_train.tsv")
    assert task.prompt == "리뷰: {comment}\n이 리뷰는 positive인가요 negative인가요?"
    assert [e.answer for e in got] == ["positive", "negative", "positive", "negative"]


def test_label_missing_from_the_label_map():
    frame = pl.DataFrame({"id": [7], "comment": ["맛있어요"], "label": [2]})
    with pytest.raises(ValueError) as err:
        build_examples(get_task(), frame)
    assert str(err.value) == ("task 'tarr-sentiment': row 1, field 'label': label 2 is not "
                              "one of 1, 0 (task.labels)")


# ----------------------------------------------------------------------------- templates


def test_custom_prompt_template():
    task = get_task(prompt="리뷰 {id}번: {comment}\n이 리뷰는 긍정인가요, 부정인가요?")
    got = examples(task, FIXTURES / "tarr_test.tsv", labelled=False)
    assert got[1].conversation == [
        user('리뷰 2번: "최악" 그 자체\n이 리뷰는 긍정인가요, 부정인가요?')]


def test_unknown_placeholder_is_named():
    task = get_task(prompt="리뷰: {review}")
    frame = read_tarr(FIXTURES / "tarr_train.tsv").frame
    with pytest.raises(TemplateError) as err:
        build_examples(task, frame)
    assert str(err.value) == ("task.prompt of task 'tarr-sentiment' uses {review}, which is "
                              "not a column; available columns: id, comment, label")


def test_unknown_answer_placeholder_is_named():
    task = get_task("aihub-summarization").replace(answer="{abstract}")
    frame = load_records(task, FIXTURES / "aihub_summarization.jsonl").frame
    with pytest.raises(TemplateError) as err:
        build_examples(task, frame)
    assert str(err.value) == ("task.answer of task 'aihub-summarization' uses {abstract}, "
                              "which is not a column; available columns: id, document, summary")
    # Test files have no answers, so the answer template is not needed there.
    assert len(build_examples(task, frame, with_answers=False)) == 2


@pytest.mark.parametrize(("template", "message"), [
    ("리뷰: {}", "placeholder {} must be a column name"),
    ("리뷰: {0}", "placeholder {0} must be a column name"),
    ("리뷰: {comment.upper}", "placeholder {comment.upper} must be a column name"),
    ("리뷰: {comment[0]}", "placeholder {comment[0]} must be a column name"),
    ("리뷰: {comment!r}", "placeholder {comment} may not have a conversion or format spec"),
    ("리뷰: {comment:>9}", "placeholder {comment} may not have a conversion or format spec"),
    ("리뷰: {comment", "expected '}' before end of string"),
    ("리뷰: comment}", "Single '}' encountered in format string"),
])
def test_malformed_templates_are_refused(template, message):
    with pytest.raises(TemplateError) as err:
        get_task(prompt=template)
    assert message in str(err.value)


def test_literal_braces_and_braces_in_values():
    assert template_fields("{{literal}} {comment} {id}") == ["comment", "id"]
    task = get_task(prompt="{{JSON}} {comment}")
    frame = pl.DataFrame({"id": [1], "comment": ["{label} 최고 {}"], "label": [1]})
    assert build_examples(task, frame)[0].conversation == [user("{JSON} {label} 최고 {}"),
                                                           model("긍정")]


# ----------------------------------------------------------------------------- spec checks


@pytest.mark.parametrize(("changes", "message"), [
    ({"kind": "regression"}, "task 'tarr-sentiment': kind 'regression', expected one of "
                             "classification, generation"),
    ({"style": "keras"}, "task 'tarr-sentiment': style 'keras', expected one of chat, plain"),
    ({"reader": "excel"}, "task 'tarr-sentiment': reader 'excel', expected one of table, "
                          "tarr, dolly"),
    ({"label_map": None}, "task 'tarr-sentiment': classification needs label_column and "
                          "label_map"),
    ({"label_map": {1: "좋음", 0: "좋음 "}}, "task 'tarr-sentiment': label words must be "
                                             "distinct and non-empty"),
    ({"kind": "generation"}, "task 'tarr-sentiment': a generation task needs an answer template"),
])
def test_task_spec_checks(changes, message):
    with pytest.raises(ValueError) as err:
        get_task().replace(**changes)
    assert str(err.value).startswith(message)


def test_dialogue_cannot_use_the_plain_style():
    with pytest.raises(ValueError, match="the plain style holds one exchange"):
        get_task("aihub-dialogue", style="plain")
    assert get_task("tarr-sentiment", style="plain").style == "plain"


def test_translation_languages_are_checked():
    with pytest.raises(ValueError, match="language 'fr'"):
        get_task("aihub-parallel", source_lang="fr")
    with pytest.raises(ValueError, match="source and target language are both 'ko'"):
        get_task("aihub-parallel", target_lang="ko")


def test_dolly_needs_two_paths():
    with pytest.raises(ValueError, match=r"reads two files, English and Korean"):
        load_records(get_task("dolly-en-ko"), FIXTURES / "dolly_en.jsonl")


def test_a_blind_dolly_test_set_is_the_english_file_alone():
    task = get_task("dolly-en-ko")
    pair = [FIXTURES / "dolly_en.jsonl", FIXTURES / "dolly_ko.jsonl"]
    paired = build_examples(task, load_records(task, pair, labelled=False).frame,
                            with_answers=False)
    alone = build_examples(task, load_records(task, pair[:1], labelled=False).frame,
                           with_answers=False)
    assert alone == paired and len(alone) > 3


def test_missing_id_column_is_named():
    frame = pl.DataFrame({"comment": ["맛있어요"], "label": [1]})
    with pytest.raises(TemplateError) as err:
        build_examples(get_task(), frame)
    assert str(err.value) == ("task 'tarr-sentiment': task.id_column = 'id' is not a column; "
                              "available columns: comment, label")


# ----------------------------------------------------------------------------- other tasks

TO_KOREAN = "Translate the following English text into Korean.\n\n"


def test_dolly_conversations():
    got = examples(get_task("dolly-en-ko"),
                   (FIXTURES / "dolly_en.jsonl", FIXTURES / "dolly_ko.jsonl"))
    assert [e.id for e in got] == ["1-instruction", "1-response", "2-instruction", "2-context",
                                   "2-response", "3-instruction", "3-context", "3-response"]
    assert got[0] == Example("1-instruction", [
        user(TO_KOREAN + "What is the capital of South Korea?"),
        model("대한민국의 수도는 어디인가요?")])
    assert got[7] == Example("3-response", [
        user(TO_KOREAN + "Kimchi is fermented Korean vegetables.\nIt is eaten with most meals."),
        model("김치는 발효시킨 한국의 채소 반찬입니다.\n대부분의 식사에 곁들여 먹습니다.")])


def test_dolly_the_other_way_round():
    task = get_task("dolly-en-ko", source_lang="ko", target_lang="en")
    got = examples(task, (FIXTURES / "dolly_en.jsonl", FIXTURES / "dolly_ko.jsonl"))
    assert got[1].conversation == [
        user("Translate the following Korean text into English.\n\n대한민국의 수도는 서울입니다."),
        model("The capital of South Korea is Seoul.")]


def test_dialogue_conversations():
    got = examples(get_task("aihub-dialogue"), FIXTURES / "aihub_dialogue.json")
    assert got[1] == Example("Pro_00002_00001", [
        user("오늘 친구가 생일 선물로 꽃을 줬어."),
        model("정말 기쁘셨겠어요. 어떤 꽃이었나요?"),
        user("내가 좋아하는 프리지아였어."),
        model("좋아하는 꽃을 기억해 준 친구라니 고마운 마음이 드시겠어요.")])
    assert [len(e.conversation) for e in got] == [6, 4]
    assert got[0].conversation[1] == model("일이 끝없이 쌓여서 많이 지치셨군요.")
    assert got[1].prompt == got[1].conversation[:3]
    assert got[1].answer == "좋아하는 꽃을 기억해 준 친구라니 고마운 마음이 드시겠어요."
    unanswered = build_examples(get_task("aihub-dialogue"),
                                load_records(get_task("aihub-dialogue"),
                                             FIXTURES / "aihub_dialogue.json").frame,
                                with_answers=False)
    assert unanswered[1].conversation == got[1].conversation[:3]


def test_parallel_default_is_korean_to_english():
    got = examples(get_task("aihub-parallel"), FIXTURES / "aihub_parallel_ko_en.csv")
    assert got == [
        Example("1", [user("Translate the following Korean text into English.\n\n"
                           "오늘 날씨가 정말 좋네요."),
                      model("The weather is really nice today.")]),
        Example("2", [user("Translate the following Korean text into English.\n\n"
                           "저는 사과, 배, 포도를 좋아합니다."),
                      model("I like apples, pears, and grapes.")]),
        Example("3", [user("Translate the following Korean text into English.\n\n"
                           '그가 말했다. "곧 돌아올게."'),
                      model('He said, "I\'ll be back soon."')]),
    ]


def test_parallel_chinese_to_korean_from_config():
    task = get_task("aihub-parallel", source_lang="zh", target_lang="ko",
                    columns={"한국어": "ko", "중국어": "zh"})
    got = examples(task, FIXTURES / "aihub_parallel_ko_zh.json")
    assert got[0].conversation == [
        user("Translate the following Chinese text into Korean.\n\n该产品的电池寿命很长。"),
        model("이 제품은 배터리 수명이 깁니다.")]
    assert task.output_columns == ("id", "ko")


def test_summarization_conversations():
    got = examples(get_task("aihub-summarization"), FIXTURES / "aihub_summarization.jsonl")
    assert got[0] == Example("1", [
        user("다음 글을 요약하세요.\n\n서울시는 내년부터 한강공원 다섯 곳에 야간 도서관을 "
             "운영한다고 밝혔다. 도서관은 오후 6시부터 10시까지 문을 연다."),
        model("서울시가 내년부터 한강공원 다섯 곳에서 야간 도서관을 운영한다.")])


def test_qa_conversations_flat_and_squad():
    task = get_task("aihub-qa")
    flat = examples(task, FIXTURES / "aihub_qa.jsonl")
    assert flat[1] == Example("2", [
        user("다음 글을 읽고 질문에 답하세요.\n\n글: 부산은 대한민국 제2의 도시이며 큰 항구가 "
             "있다.\n\n질문: 대한민국 제2의 도시는?"),
        model("부산")])
    squad = examples(task, FIXTURES / "aihub_qa_squad.json")
    assert squad[2] == Example("m2_q1", [
        user("다음 글을 읽고 질문에 답하세요.\n\n글: 제주도는 대한민국에서 가장 큰 섬이며 "
             "한라산이 있다.\n\n질문: 제주도에 있는 산은?"),
        model("한라산")])


# ----------------------------------------------------------------------------- split


def test_split_is_deterministic_and_stratified_on_the_real_file():
    frame = read_tarr(TARR / "train.tsv").frame
    train, valid = train_validation_split(frame, validation_fraction=0.1, seed=13,
                                          stratify_by="label")
    again_train, again_valid = train_validation_split(frame, validation_fraction=0.1, seed=13,
                                                      stratify_by="label")
    assert train.equals(again_train) and valid.equals(again_valid)
    counts = frame["label"].value_counts().sort("label")["count"].to_list()  # [138, 162]
    valid_counts = valid["label"].value_counts().sort("label")["count"].to_list()
    assert valid_counts == [round(n * 0.1) for n in counts] == [14, 16]
    # A partition of the rows, each part in file order.
    ids = sorted(train["id"].to_list() + valid["id"].to_list())
    assert ids == list(range(300))
    assert set(train["id"]).isdisjoint(set(valid["id"]))
    assert train["id"].is_sorted() and valid["id"].is_sorted()
    other_train, other_valid = train_validation_split(frame, validation_fraction=0.1, seed=14,
                                                      stratify_by="label")
    assert set(other_valid["id"]) != set(valid["id"])


def test_split_picks_within_each_label_whatever_the_interleaving():
    frame = read_tarr(TARR / "train.tsv").frame  # starts with a label 1
    _, valid = train_validation_split(frame, validation_fraction=0.2, seed=0,
                                      stratify_by="label")
    # Same rows per label in the same order, but all the 0s first.
    grouped = pl.concat([frame.filter(pl.col("label") == 0), frame.filter(pl.col("label") == 1)])
    _, valid_grouped = train_validation_split(grouped, validation_fraction=0.2, seed=0,
                                              stratify_by="label")
    assert len(valid) == 60
    assert sorted(valid_grouped["id"]) == sorted(valid["id"])


def test_split_without_strata_and_edge_fractions():
    frame = pl.DataFrame({"id": list(range(10))})
    train, valid = train_validation_split(frame, validation_fraction=0.25, seed=3)
    assert len(valid) == 3 and len(train) == 7  # round(2.5) goes up
    train, valid = train_validation_split(frame, validation_fraction=0.0, seed=3)
    assert train.equals(frame) and len(valid) == 0
    with pytest.raises(ValueError, match=r"validation_fraction must be in \[0, 1\)"):
        train_validation_split(frame, validation_fraction=1.0, seed=3)
    with pytest.raises(ValueError, match="cannot stratify by 'label'"):
        train_validation_split(frame, validation_fraction=0.5, seed=3, stratify_by="label")


# ----------------------------------------------------------------------------- [task] section


def _task(*overrides: str):
    from kaggle_pipeline.run_config import load_config
    from kaggle_pipeline.run_setup import task_spec

    return task_spec(load_config(None, list(overrides)))


def test_presets_adjusted_by_task_keys():
    assert _task() == get_task("tarr-sentiment")  # the main job's task, unchanged
    reverse = _task("data.task=aihub-parallel", "task.source_language=en",
                    "task.target_language=ko")
    assert reverse.prompt == "Translate the following English text into Korean.\n\n{en}"
    assert (reverse.answer, reverse.output_columns) == ("{ko}", ("id", "ko"))
    three = _task('task.labels={"2" = "중립", "1" = "긍정", "0" = "부정"}', "task.metric=macro_f1")
    assert three.label_map == {2: "중립", 1: "긍정", 0: "부정"}  # the reader's integer labels
    assert three.prompt == "리뷰: {comment}\n이 리뷰는 중립인가요 긍정인가요 부정인가요?"
    assert three.metric == "macro_f1" and three.reader == "tarr"
    with pytest.raises(ValueError, match="task.labels: 'pos' is not an integer, and task "
                                         "'tarr-sentiment' reads integer labels"):
        _task('task.labels={pos = "좋음", neg = "나쁨"}')
    with pytest.raises(ValueError, match="metric 'bleu' does not score a classification task"):
        _task("task.metric=bleu")


def test_a_task_of_its_own_reads_exactly_its_columns(tmp_path):
    spec = _task("task.kind=generation", "task.prompt=Q: {question}", "task.answer={reply}",
                 "task.system=Be brief.", "output.name=qa", "data.train=train.jsonl")
    assert (spec.name, spec.reader, spec.output_columns) == ("qa", "table", ("id", "reply"))
    train = tmp_path / "train.jsonl"
    train.write_text('{"question": "하나?", "reply": "둘", "extra": [1]}\n'
                     '{"question": "셋?", "reply": "넷", "extra": null}\n', encoding="utf-8")
    examples = build_examples(spec, load_records(spec, train).frame)
    assert [e.id for e in examples] == ["1", "2"]  # no id column: row positions
    assert examples[0].conversation == [Turn("system", "Be brief."), user("Q: 하나?"),
                                        model("둘")]
    test = tmp_path / "test.jsonl"
    test.write_text('{"question": ""}\n{"question": "다섯?"}\n', encoding="utf-8")
    blind = build_examples(spec, load_records(spec, test, labelled=False).frame,
                           with_answers=False)
    assert [e.prompt[-1].text for e in blind] == ["Q: ", "Q: 다섯?"]  # an empty one is kept

    labelled = _task("task.kind=classification", "task.prompt={text}", "task.id_column=key",
                     "task.label_column=y", 'task.labels={"1" = "yes", "0" = "no"}',
                     "data.train=rows.jsonl")
    assert labelled.output_columns == ("key", "y")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"key": 17, "text": "a", "y": 1}\n{"key": 18, "text": "b", "y": 0}\n')
    frame = load_records(labelled, rows).frame
    assert frame["key"].to_list() == ["17", "18"] and frame["y"].to_list() == ["1", "0"]
    assert [e.label for e in build_examples(labelled, frame)] == ["1", "0"]
    with pytest.raises(ValueError, match=r"missing column 'y' \(task.label_column\); the file "
                                         r"has columns: 'key', 'text'"):
        bad = tmp_path / "bad.csv"
        bad.write_text("key,text\n1,a\n", encoding="utf-8")
        load_records(labelled, bad)
    with pytest.raises(ValueError, match=r"line 2, field 'key': duplicate value '17' \(first "
                                         r"at line 1\)"):
        rows.write_text('{"key": 17, "text": "a", "y": 1}\n{"key": 17, "text": "b", "y": 0}\n')
        load_records(labelled, rows)
