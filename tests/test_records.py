import json
from pathlib import Path

import polars as pl
import pytest
from conftest import FIXTURES
from conftest import REPO as ROOT

from kaggle_pipeline.data.records import (
    DataError,
    SkippedRow,
    read_aihub_dialogue,
    read_dolly_pairs,
    read_parallel,
    read_qa,
    read_summarization,
    read_table,
    read_tarr,
)

TARR = ROOT / "data" / "tarr"


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def read_tarr_text(tmp_path: Path, text: str | bytes, **options):
    return read_tarr(write(tmp_path, "train.tsv", text), **options)


# ----------------------------------------------------------------------------- real tarr files


def test_real_tarr_train_loads_cleanly():
    result = read_tarr(TARR / "train.tsv")
    frame = result.frame
    assert result.skipped == ()
    assert frame.columns == ["id", "comment", "label"]
    assert frame.schema == {"id": pl.Int64, "comment": pl.String, "label": pl.Int64}
    assert len(frame) == 300
    assert frame["id"].to_list() == list(range(300))  # README: ids number the rows from 0
    assert set(frame["label"].to_list()) == {0, 1}
    # The first line of the file, verbatim.
    first_line = (TARR / "train.tsv").read_text(encoding="utf-8").split("\n")[1]
    assert frame.row(0) == (0, first_line.split("\t")[1], int(first_line.split("\t")[2]))


def test_real_tarr_test_loads_cleanly():
    result = read_tarr(TARR / "test.tsv", labelled=False)
    assert result.skipped == ()
    assert result.frame.columns == ["id", "comment"]
    assert len(result.frame) == 100
    assert result.frame["id"].to_list() == list(range(1, 101))  # README: ids 1 to 100
    assert result.frame["comment"].str.strip_chars().str.len_chars().min() > 0


# ----------------------------------------------------------------------------- tarr fixture


def test_tarr_fixture_reads_exact_rows():
    result = read_tarr(FIXTURES / "tarr_train.tsv")
    assert result.frame.rows() == [
        (0, "국물이 진하고 면이 쫄깃해요 ㄹㅇ 맛집👍", 1),
        (1, '"웨이팅 1시간" 실화냐... 맛은 그냥 그럼', 0),  # a leading quote is text in TSV
        (2, "사장님 친절하시고 가격도 착해요ㅋㅋ", 1),
        (3, "ㅁㅊ 이 가격에 이 양? 다시는 안 감", 0),
    ]
    assert result.row_where == ("line 2", "line 3", "line 4", "line 5")
    assert result.rows_read == 4
    assert result.report() == "read 4 rows, skipped none"


def test_tarr_test_fixture_has_no_label():
    result = read_tarr(FIXTURES / "tarr_test.tsv", labelled=False)
    assert result.frame.rows() == [(1, "분위기 좋고 디저트도 맛있어요"), (2, '"최악" 그 자체')]


def test_tarr_reads_crlf_and_blank_lines(tmp_path):
    text = "id\tcomment\tlabel\r\n0\t좋아요\t1\r\n\r\n1\t별로\t0\r\n"
    result = read_tarr_text(tmp_path, text)
    assert result.frame.rows() == [(0, "좋아요", 1), (1, "별로", 0)]
    assert result.row_where == ("line 2", "line 4")


# ----------------------------------------------------------------------------- bad rows

HEADER = "id\tcomment\tlabel\n"


@pytest.mark.parametrize(("body", "expected"), [
    ("0\t좋아요\t1\n1\t\t0\n", "line 3, field 'comment': empty text"),
    ("0\t좋아요\t1\n1\t   \t0\n", "line 3, field 'comment': whitespace-only text"),
    ("0\t좋아요\t1\n1\t별로\t2\n", "line 3, field 'label': label 2 is not one of 0, 1"),
    ("0\t좋아요\t1\n1\t별로\tneg\n",
     "line 3, field 'label': expected an integer, got text ('neg')"),
    ("0\t좋아요\t1\n1\t별로\t\n", "line 3, field 'label': empty value"),
    ("0\t좋아요\t1\nx1\t별로\t0\n", "line 3, field 'id': expected an integer, got text ('x1')"),
    ("0\t좋아요\t1\n1\t별로\n", "line 3: has 2 fields but the header has 3"),
    ("0\t좋아요\t1\n1\t별로\t진짜\t0\n",
     "line 3: has 4 fields but the header has 3 (a tab inside the text?)"),
    ("0\t좋아요\t1\n0\t별로\t0\n", "line 3, field 'id': duplicate value 0 (first at line 2)"),
])
def test_bad_tsv_row_names_file_line_and_field(tmp_path, body, expected):
    path = write(tmp_path, "train.tsv", HEADER + body)
    with pytest.raises(DataError) as err:
        read_tarr(path)
    assert str(err.value) == f"{path}: {expected}"


def test_missing_column_names_the_file_and_the_columns_found(tmp_path):
    path = write(tmp_path, "train.tsv", "id\tcomment\n0\t좋아요\n")
    with pytest.raises(DataError) as err:
        read_tarr(path)
    assert str(err.value) == (f"{path}: missing column 'label'; the file has columns: "
                              "'id', 'comment'")


def test_missing_mapped_column_names_both_names(tmp_path):
    path = write(tmp_path, "pairs.csv", "ko,en\n안녕,hello\n")
    with pytest.raises(DataError) as err:
        read_parallel(path, columns={"원문": "ko", "번역문": "en"})
    assert str(err.value) == (f"{path}: missing column '원문' (read as 'ko'); the file has "
                              "columns: 'ko', 'en'")


def test_invalid_utf8_names_the_line(tmp_path):
    data = HEADER.encode() + "0\t좋아요\t1\n1\t".encode() + b"\xff\xfe" + b"\t0\n"
    path = write(tmp_path, "train.tsv", data)
    with pytest.raises(DataError) as err:
        read_tarr(path)
    assert str(err.value) == f"{path}: line 3: invalid UTF-8 (byte 0xff at byte column 3)"


def test_cp949_file_gets_a_hint(tmp_path):
    path = write(tmp_path, "train.tsv", (HEADER + "0\t맛있어요\t1\n").encode("cp949"))
    with pytest.raises(DataError) as err:
        read_tarr(path)
    assert str(err.value) == (f"{path}: line 2: invalid UTF-8 (byte 0xb8 at byte column 3); "
                              "the file looks like CP949/EUC-KR: save it as UTF-8")


@pytest.mark.parametrize(("line", "expected"), [
    ({"id": 1, "comment": "별로", "label": None}, "line 2, field 'label': null value"),
    ({"id": 1, "comment": "별로"}, "line 2, field 'label': missing field"),
    ({"id": 1, "comment": 123, "label": 0}, "line 2, field 'comment': expected text, "
                                            "got a number (123)"),
    ({"id": 1, "comment": "별로", "label": True}, "line 2, field 'label': expected an "
                                                 "integer, got a boolean (True)"),
    ({"id": 1, "comment": "별로", "label": 1.0}, "line 2, field 'label': expected an integer, "
                                                "got a number (1.0)"),
    ({"id": 1, "comment": ["별로"], "label": 0}, "line 2, field 'comment': expected text, "
                                                 "got a list (['별로'])"),
])
def test_bad_json_lines_row_names_line_and_field(tmp_path, line, expected):
    good = {"id": 0, "comment": "좋아요", "label": 1}
    text = json.dumps(good, ensure_ascii=False) + "\n" + json.dumps(line, ensure_ascii=False)
    path = write(tmp_path, "train.jsonl", text + "\n")
    with pytest.raises(DataError) as err:
        read_tarr(path, fmt="jsonl")
    assert str(err.value) == f"{path}: {expected}"


def test_broken_json_line(tmp_path):
    path = write(tmp_path, "data.jsonl", '{"document": "a", "summary": "b"}\n{"document": \n')
    with pytest.raises(DataError) as err:
        read_summarization(path)
    assert str(err.value) == f"{path}: line 2: not valid JSON (Expecting value at column 14)"


def test_broken_json_document(tmp_path):
    path = write(tmp_path, "data.json", '[{"document": "a",\n "summary": }]')
    with pytest.raises(DataError) as err:
        read_summarization(path)
    assert str(err.value) == f"{path}: line 2, column 13: not valid JSON: Expecting value"


def test_json_record_numbers_and_wrong_type(tmp_path):
    records = [{"document": "글", "summary": "요약"}, {"document": "글", "summary": 3}]
    path = write(tmp_path, "data.json", json.dumps({"data": records}, ensure_ascii=False))
    with pytest.raises(DataError) as err:
        read_summarization(path)
    assert str(err.value) == f"{path}: record 2, field 'summary': expected text, got a number (3)"


def test_json_column_missing_from_every_record(tmp_path):
    path = write(tmp_path, "data.json", json.dumps([{"document": "글"}], ensure_ascii=False))
    with pytest.raises(DataError) as err:
        read_summarization(path)
    assert str(err.value) == f"{path}: missing column 'summary'; the file has columns: 'document'"


def test_parquet_rows_are_data_rows(tmp_path):
    path = tmp_path / "train.parquet"
    pl.DataFrame({"id": [0, 1], "comment": ["좋아요", " "], "label": [1, 0]}).write_parquet(path)
    with pytest.raises(DataError) as err:
        read_tarr(path, fmt="parquet")
    assert str(err.value) == f"{path}: data row 2, field 'comment': whitespace-only text"
    ok = tmp_path / "ok.parquet"
    pl.DataFrame({"id": [0], "comment": ["좋아요"], "label": [1]}).write_parquet(ok)
    assert read_tarr(ok, fmt=None).frame.rows() == [(0, "좋아요", 1)]


def test_unknown_suffix_and_excel_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"cannot tell the format from the suffix '\.txt'"):
        read_table(write(tmp_path, "a.txt", "x\n1\n"), required=["x"])
    with pytest.raises(DataError, match="save the sheet as CSV UTF-8"):
        read_table(write(tmp_path, "a.xlsx", b"PK"), required=["x"])


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_tarr(tmp_path / "nope.tsv")


# ----------------------------------------------------------------------------- skip mode


def test_skip_drops_bad_rows_and_reports_which_and_why(tmp_path):
    body = ("0\t좋아요\t1\n"
            "1\t\t0\n"
            "2\t최고\t5\n"
            "3\t괜찮아요\t1\n"
            "4\t별로\n"
            "3\t또 3번\t0\n"
            "6\t맛없음\t0\n")
    path = write(tmp_path, "train.tsv", HEADER + body)
    result = read_tarr(path, on_bad_row="skip")
    assert result.frame.rows() == [(0, "좋아요", 1), (3, "괜찮아요", 1), (6, "맛없음", 0)]
    assert result.row_where == ("line 2", "line 5", "line 8")
    assert result.rows_read == 7
    assert result.skipped == (
        SkippedRow(path, "line 3", "comment", "empty text"),
        SkippedRow(path, "line 4", "label", "label 5 is not one of 0, 1"),
        SkippedRow(path, "line 6", None, "has 2 fields but the header has 3"),
        SkippedRow(path, "line 7", "id", "duplicate value 3 (first at line 5)"),
    )
    assert result.report() == "\n".join([
        "read 3 rows, skipped 4 of 7:",
        f"  {path}: line 3, field 'comment': empty text",
        f"  {path}: line 4, field 'label': label 5 is not one of 0, 1",
        f"  {path}: line 6: has 2 fields but the header has 3",
        f"  {path}: line 7, field 'id': duplicate value 3 (first at line 5)",
    ])


def test_skip_drops_invalid_utf8_lines_and_keeps_line_numbers(tmp_path):
    lines = [json.dumps({"document": f"글 {i}", "summary": f"요약 {i}"}, ensure_ascii=False)
             for i in range(4)]
    data = (lines[0] + "\n").encode() + b'{"document": "\xc3\x28"}\n' \
        + (lines[1] + "\n" + lines[2] + "\n").encode() + b'{"document": 1}\n'
    path = write(tmp_path, "docs.jsonl", data)
    result = read_summarization(path, on_bad_row="skip")
    assert result.frame.rows() == [("1", "글 0", "요약 0"), ("3", "글 1", "요약 1"),
                                   ("4", "글 2", "요약 2")]
    assert result.skipped == (
        SkippedRow(path, "line 2", None, "invalid UTF-8 (byte 0xc3 at byte column 15)"),
        SkippedRow(path, "line 5", "document", "expected text, got a number (1)"),
    )


def test_skip_with_no_good_row_left_is_an_error(tmp_path):
    path = write(tmp_path, "train.tsv", HEADER + "0\t\t1\n")
    with pytest.raises(DataError) as err:
        read_tarr(path, on_bad_row="skip")
    assert str(err.value) == (f"{path}: no usable rows; 1 rows skipped, the first: "
                              f"{path}: line 2, field 'comment': empty text")


def test_on_bad_row_must_be_known(tmp_path):
    with pytest.raises(ValueError, match="on_bad_row must be one of"):
        read_tarr(FIXTURES / "tarr_train.tsv", on_bad_row="ignore")


# ----------------------------------------------------------------------------- dolly


def test_dolly_pairs_align_row_by_row():
    result = read_dolly_pairs(FIXTURES / "dolly_en.jsonl", FIXTURES / "dolly_ko.jsonl")
    assert result.frame.columns == ["id", "record", "field", "category", "en", "ko"]
    assert result.frame.select("id", "category", "en", "ko").rows() == [
        ("1-instruction", "open_qa", "What is the capital of South Korea?",
         "대한민국의 수도는 어디인가요?"),
        ("1-response", "open_qa", "The capital of South Korea is Seoul.",
         "대한민국의 수도는 서울입니다."),
        ("2-instruction", "closed_qa", "When was Hangul created?", "한글은 언제 만들어졌나요?"),
        ("2-context", "closed_qa",
         "Hangul, the Korean alphabet, was created in 1443 by King Sejong the Great and "
         "published in 1446.",
         "한국의 문자인 한글은 1443년 세종대왕이 만들었고 1446년에 반포되었습니다."),
        ("2-response", "closed_qa", "Hangul was created in 1443.",
         "한글은 1443년에 만들어졌습니다."),
        ("3-instruction", "summarization", "Summarize the paragraph.", "이 문단을 요약하세요."),
        ("3-context", "summarization",
         "Kimchi is a traditional Korean side dish of salted and fermented vegetables, most "
         "often napa cabbage and Korean radish.",
         "김치는 소금에 절여 발효시킨 채소로 만드는 한국의 전통 반찬으로, "
         "주로 배추와 무를 씁니다."),
        ("3-response", "summarization",
         "Kimchi is fermented Korean vegetables.\nIt is eaten with most meals.",
         "김치는 발효시킨 한국의 채소 반찬입니다.\n대부분의 식사에 곁들여 먹습니다."),
    ]
    assert result.frame["record"].to_list() == [1, 1, 2, 2, 2, 3, 3, 3]


def _dolly_lines(tmp_path, name, rows):
    return write(tmp_path, name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _dolly(instruction, response, category="open_qa", context=""):
    return {"instruction": instruction, "context": context, "response": response,
            "category": category}


def test_dolly_row_count_mismatch(tmp_path):
    en = _dolly_lines(tmp_path, "en.jsonl", [_dolly("a", "b"), _dolly("c", "d")])
    ko = _dolly_lines(tmp_path, "ko.jsonl", [_dolly("가", "나")])
    with pytest.raises(DataError) as err:
        read_dolly_pairs(en, ko)
    assert str(err.value) == (f"dolly files do not line up: {en} has 2 records, "
                              f"{ko} has 1")


def test_dolly_category_mismatch(tmp_path):
    en = _dolly_lines(tmp_path, "en.jsonl", [_dolly("a", "b"), _dolly("c", "d", "brainstorming")])
    ko = _dolly_lines(tmp_path, "ko.jsonl", [_dolly("가", "나"), _dolly("다", "라", "open_qa")])
    with pytest.raises(DataError) as err:
        read_dolly_pairs(en, ko)
    assert str(err.value) == (f"{en}: line 2, field 'category': 'brainstorming' here but "
                              f"'open_qa' in {ko}")
    skipped = read_dolly_pairs(en, ko, on_bad_row="skip")
    assert skipped.frame["id"].to_list() == ["1-instruction", "1-response"]
    assert [str(row) for row in skipped.skipped] == [
        f"{en}: line 2, field 'category': 'brainstorming' here but 'open_qa' in {ko}"]


def test_dolly_aligns_by_record_not_by_line(tmp_path):
    en = _dolly_lines(tmp_path, "en.jsonl", [_dolly("a", "b"), _dolly("c", "d")])
    ko = write(tmp_path, "ko.jsonl", "\n" + "".join(
        json.dumps(r, ensure_ascii=False) + "\n" for r in [_dolly("가", "나"), _dolly("다", "라")]))
    result = read_dolly_pairs(en, ko)
    assert result.frame.select("id", "en", "ko").rows() == [
        ("1-instruction", "a", "가"), ("1-response", "b", "나"),
        ("2-instruction", "c", "다"), ("2-response", "d", "라")]
    assert result.row_index == (0, 0, 1, 1)


def test_dolly_context_in_one_file_only(tmp_path):
    en = _dolly_lines(tmp_path, "en.jsonl", [_dolly("a", "b", context="some context")])
    ko = _dolly_lines(tmp_path, "ko.jsonl", [_dolly("가", "나")])
    with pytest.raises(DataError) as err:
        read_dolly_pairs(en, ko)
    assert str(err.value) == f"{en}: line 1, field 'context': empty in {ko} only"


def test_dolly_bad_row_in_one_file_drops_the_pair_when_skipping(tmp_path):
    en = _dolly_lines(tmp_path, "en.jsonl", [_dolly("a", "b"), _dolly("c", "d")])
    ko = _dolly_lines(tmp_path, "ko.jsonl", [_dolly("가", ""), _dolly("다", "라")])
    with pytest.raises(DataError) as err:
        read_dolly_pairs(en, ko)
    assert str(err.value) == f"{ko}: line 1, field 'response': empty text"
    result = read_dolly_pairs(en, ko, on_bad_row="skip")
    assert result.frame.select("id", "en", "ko").rows() == [("2-instruction", "c", "다"),
                                                            ("2-response", "d", "라")]
    assert result.skipped == (SkippedRow(ko, "line 1", "response", "empty text"),)


# ----------------------------------------------------------------------------- AI Hub dialogue


def test_aihub_dialogue_fixture():
    result = read_aihub_dialogue(FIXTURES / "aihub_dialogue.json")
    assert result.frame.columns == ["id", "emotion", "turns"]
    assert result.frame.rows() == [
        ("Pro_00001_00001", "E18", [
            "회사 일은 해도 해도 끝이 없어서 화가 나.",
            "일이 끝없이 쌓여서 많이 지치셨군요.",  # trailing space stripped
            "응, 주말에도 일해야 할 것 같아.",
            "주말까지 일해야 한다니 속상하시겠어요.",
            "팀장님께 업무를 나눠 달라고 말해 볼까 봐.",
            "좋은 생각이에요. 어떻게 말씀드릴지 함께 정리해 봐요."]),
        ("Pro_00002_00001", "E64", [
            "오늘 친구가 생일 선물로 꽃을 줬어.",
            "정말 기쁘셨겠어요. 어떤 꽃이었나요?",
            "내가 좋아하는 프리지아였어.",
            "좋아하는 꽃을 기억해 준 친구라니 고마운 마음이 드시겠어요."]),
    ]


def _dialogue_file(tmp_path, content):
    good = {"talk": {"content": {"HS01": "안녕", "SS01": "반가워요", "HS02": "", "SS02": "",
                                 "HS03": "", "SS03": ""}}}
    item = {"profile": {"emotion": {"type": "E10"}}, "talk": {"content": content}}
    return write(tmp_path, "dialogue.json", json.dumps([good, item], ensure_ascii=False))


@pytest.mark.parametrize(("content", "expected"), [
    ({"HS01": "a", "SS01": "b", "HS02": "c", "SS02": "", "HS03": "", "SS03": ""},
     "record 2, field 'talk.content.SS02': the last human utterance has no reply"),
    ({"HS01": "a", "SS01": "", "HS02": "c", "SS02": "d", "HS03": "", "SS03": ""},
     "record 2, field 'talk.content.HS02': utterance after the dialogue ended "
     "(talk.content.SS01 is empty)"),
    ({"HS01": "a", "SS01": 7}, "record 2, field 'talk.content.SS01': expected text, got a "
                               "number (7)"),
    ({"HS01": " ", "SS01": ""}, "record 2, field 'talk.content.HS01': empty dialogue"),
    ({"SS01": "b"}, "record 2, field 'talk.content.HS01': missing field"),
    (None, "record 2, field 'talk.content': missing field"),
])
def test_bad_dialogue_names_record_and_field(tmp_path, content, expected):
    path = _dialogue_file(tmp_path, content)
    with pytest.raises(DataError) as err:
        read_aihub_dialogue(path)
    assert str(err.value) == f"{path}: {expected}"
    result = read_aihub_dialogue(path, on_bad_row="skip")
    assert result.frame.rows() == [("1", None, ["안녕", "반가워요"])]  # id from record number
    assert [str(row) for row in result.skipped] == [f"{path}: {expected}"]


# ----------------------------------------------------------------------------- parallel


def test_parallel_csv_from_excel():
    result = read_parallel(FIXTURES / "aihub_parallel_ko_en.csv",
                           columns={"원문": "ko", "번역문": "en"})
    assert result.frame.columns == ["id", "ko", "en"]
    assert result.frame.rows() == [
        ("1", "오늘 날씨가 정말 좋네요.", "The weather is really nice today."),
        ("2", "저는 사과, 배, 포도를 좋아합니다.", "I like apples, pears, and grapes."),
        ("3", '그가 말했다. "곧 돌아올게."', 'He said, "I\'ll be back soon."'),
    ]


def test_parallel_json_either_direction():
    path = FIXTURES / "aihub_parallel_ko_zh.json"
    result = read_parallel(path, languages=("zh", "ko"), columns={"한국어": "ko", "중국어": "zh"})
    assert result.frame.rows() == [
        ("1", "该产品的电池寿命很长。", "이 제품은 배터리 수명이 깁니다."),
        ("2", "会议下午三点开始。", "회의는 오후 세 시에 시작합니다."),
    ]
    unlabelled = read_parallel(path, languages=("ko", "zh"), columns={"한국어": "ko"},
                               labelled=False)
    assert unlabelled.frame.columns == ["id", "ko"]


def test_parallel_csv_quote_error_names_the_line(tmp_path):
    path = write(tmp_path, "pairs.csv", '원문,번역문\n안녕,hello\n"안녕,hi\n')
    with pytest.raises(DataError) as err:
        read_parallel(path, columns={"원문": "ko", "번역문": "en"})
    assert str(err.value) == f"{path}: line 3: unexpected end of data"


# ----------------------------------------------------------------------------- summarization, QA


def test_summarization_fixture():
    result = read_summarization(FIXTURES / "aihub_summarization.jsonl")
    assert result.frame.rows() == [
        ("1", "서울시는 내년부터 한강공원 다섯 곳에 야간 도서관을 운영한다고 밝혔다. "
              "도서관은 오후 6시부터 10시까지 문을 연다.",
         "서울시가 내년부터 한강공원 다섯 곳에서 야간 도서관을 운영한다."),
        ("2", "올해 여름은 평년보다 덥고 비가 많이 올 것으로 예상된다. "
              "기상청은 폭염과 집중호우에 대비할 것을 당부했다.",
         "기상청은 올여름이 덥고 비가 많을 것으로 보고 대비를 당부했다."),
    ]


def test_qa_flat_fixture():
    result = read_qa(FIXTURES / "aihub_qa.jsonl")
    assert result.frame.rows() == [
        ("1", "경복궁은 1395년 조선의 법궁으로 지어졌다.", "경복궁은 언제 지어졌나?", "1395년"),
        ("2", "부산은 대한민국 제2의 도시이며 큰 항구가 있다.", "대한민국 제2의 도시는?", "부산"),
    ]


def test_qa_squad_fixture():
    result = read_qa(FIXTURES / "aihub_qa_squad.json")
    context = "한강은 강원도에서 시작해 서울을 지나 황해로 흐른다. 길이는 약 494킬로미터이다."
    assert result.frame.rows() == [
        ("m1_q1", context, "한강의 길이는?", "약 494킬로미터"),
        ("m1_q2", context, "한강은 어디로 흐르나?", "황해"),
        ("m2_q1", "제주도는 대한민국에서 가장 큰 섬이며 한라산이 있다.", "제주도에 있는 산은?",
         "한라산"),
    ]
    assert result.row_where == ("data[0].paragraphs[0].qas[0]", "data[0].paragraphs[0].qas[1]",
                                "data[1].paragraphs[0].qas[0]")


def test_qa_squad_question_without_answer(tmp_path):
    document = {"data": [{"paragraphs": [{"context": "글", "qas": [
        {"id": "q1", "question": "질문?", "answers": [{"text": "답"}]},
        {"id": "q2", "question": "질문?", "answers": []}]}]}]}
    path = write(tmp_path, "qa.json", json.dumps(document, ensure_ascii=False))
    with pytest.raises(DataError) as err:
        read_qa(path)
    assert str(err.value) == (f"{path}: data[0].paragraphs[0].qas[1], field 'answers': "
                              "no answer (missing, empty or not a list)")
    assert read_qa(path, labelled=False).frame.rows() == [("q1", "글", "질문?"),
                                                          ("q2", "글", "질문?")]
