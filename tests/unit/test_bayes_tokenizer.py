"""The Bayes tokenizer: European and Chinese text, URLs, addresses, headers and attachments."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.bayes.tokenizer import MAX_WORD, tokenize, tokenize_headers, tokenize_text
from gateway.content import Attachment, ParsedMessage


def text_tokens(text: str) -> set[str]:
    return set(tokenize_text(text))


def header_tokens(*headers: tuple[str, str]) -> set[str]:
    return set(tokenize_headers(headers))


# --- European languages ----------------------------------------------------------


def test_words_are_lower_cased_and_counted_once() -> None:
    assert text_tokens("Cheap CHEAP cheap Watches!") == {"cheap", "watches"}


def test_words_shorter_than_three_letters_are_left_out() -> None:
    assert text_tokens("a to be or not") == {"not"}


def test_a_long_word_gives_its_shape_not_its_spelling() -> None:
    word = "x" * (MAX_WORD + 1)
    assert text_tokens("twelve-chars " + word + " " + "q" * 35) == {"twelve-chars", "skip:x 10", "skip:q 30"}


def test_accented_letters_stay_in_their_words() -> None:
    assert text_tokens("Grüße aus Köln, café crème") == {"grüße", "aus", "köln", "café", "crème"}


def test_punctuation_around_words_is_trimmed_but_money_keeps_its_sign() -> None:
    assert text_tokens('"Hello," (world) ...really... $100') == {"hello", "world", "really", "$100"}


def test_full_width_latin_is_the_same_word_as_ascii() -> None:
    assert text_tokens("ＦＲＥＥ Ｖｉａｇｒａ") == {"free", "viagra"}  # noqa: RUF001 (full-width on purpose)


# --- Chinese and Japanese ----------------------------------------------------------


def test_chinese_text_gives_character_bigrams() -> None:
    assert text_tokens("免费发票") == {"免费", "费发", "发票"}


def test_a_lone_chinese_character_is_a_token_of_its_own() -> None:
    assert text_tokens("买 房") == {"买", "房"}


def test_chinese_punctuation_and_latin_split_the_runs() -> None:
    tokens = text_tokens("代开发票，联系QQ12345678。优惠")  # noqa: RUF001 (a Chinese comma)
    assert {"代开", "开发", "发票", "联系", "优惠", "qq12345678"} == tokens
    assert "票联" not in tokens  # the comma ends a run


def test_traditional_chinese_and_japanese_kana_are_split_too() -> None:
    assert text_tokens("發票") == {"發票"}
    assert text_tokens("セール") == {"セー", "ール"}


def test_chinese_subject_words_are_bigrams_with_the_header_prefix() -> None:
    assert header_tokens(("Subject", "代开发票")) >= {"subject:代开", "subject:开发", "subject:发票"}


# --- URLs and addresses ------------------------------------------------------------


def test_a_url_gives_its_scheme_host_parents_and_path_words() -> None:
    tokens = text_tokens("click https://www.Pills.example.com/buy/now?ref=promo")
    assert {"click", "proto:https", "url:www.pills.example.com", "url:pills.example.com"} <= tokens
    assert {"url:example.com", "url:buy", "url:now", "url:ref", "url:promo"} <= tokens
    assert "https" not in tokens  # the URL is not read again as words


def test_a_url_to_a_bare_ip_address_is_a_clue() -> None:
    assert "url:ip-address" in text_tokens("see http://203.0.113.9/login")


def test_an_address_in_the_text_gives_its_name_and_domains() -> None:
    tokens = text_tokens("write to sales.team@mail.example.org today")
    assert {"emailname:sales.team", "emailaddr:mail.example.org", "emailaddr:example.org"} <= tokens
    assert {"write", "today"} <= tokens


# --- headers -----------------------------------------------------------------------


def test_subject_words_are_prefixed_and_its_shape_counted() -> None:
    tokens = header_tokens(("Subject", "FREE MONEY NOW!!!"))
    assert {
        "subject:free",
        "subject:money",
        "subject:now",
        "subject:shape:upper",
        "subject:shape:!!!",
    } <= tokens


def test_the_gateways_subject_tag_is_not_learned() -> None:
    assert header_tokens(("Subject", "SPAM*** lunch")) == header_tokens(("Subject", "lunch"))
    assert "subject:spam" not in header_tokens(("Subject", "SPAM*** lunch"))


def test_the_gateways_own_headers_are_not_learned() -> None:
    assert header_tokens(("X-Mailgate-Bayes", "9.80"), ("X-Mailgate-Score", "9.8")) == set()


def test_from_gives_address_parts_and_display_name_words() -> None:
    tokens = header_tokens(("From", "Best Deals <promo@offers.example.net>"))
    assert {"from:addr:offers.example.net", "from:addr:example.net", "from:name:promo"} <= tokens
    assert {"from:name:best", "from:name:deals"} <= tokens


def test_received_gives_the_client_networks_and_domains() -> None:
    tokens = header_tokens(
        ("Received", "from mx.spammer.example (unknown [203.0.113.5]) by gw.test with ESMTP id X; Mon, 1 Jan")
    )
    assert {
        "received:203.0.113",
        "received:203.0",
        "received:spammer.example",
        "received:has:esmtp",
    } <= tokens


def test_recipients_are_counted_not_listed() -> None:
    tokens = header_tokens(("To", "a@example.com, b@example.com, c@example.org"))
    assert {"to:count:3", "to:addr:example.com", "to:addr:example.org"} <= tokens


def test_content_type_and_charset_are_tokens() -> None:
    tokens = header_tokens(("Content-Type", 'text/html; charset="GB2312"'))
    assert tokens == {"content-type:text/html", "content-type:charset:gb2312"}


def test_message_id_gives_its_domain_or_says_it_is_odd() -> None:
    assert header_tokens(("Message-ID", "<abc@mail.example.com>")) == {"message-id:@example.com"}
    assert header_tokens(("Message-ID", "<abc@[203.0.113.1]>")) == {"message-id:@ip"}
    assert header_tokens(("Message-ID", "garbage")) == {"message-id:invalid"}


# --- the whole message --------------------------------------------------------------


def test_a_message_gives_header_text_and_attachment_tokens() -> None:
    message = ParsedMessage(
        headers=(("Subject", "Invoice"), ("From", "billing@example.com")),
        text="Please find the invoice attached. 请查收发票",
        attachments=(Attachment("Invoice.PDF.exe", "application/x-msdownload", b"MZ"),),
    )
    tokens = tokenize(message)
    assert {"subject:invoice", "from:addr:example.com", "please", "invoice", "attached", "发票"} <= tokens
    assert {"attachment:type:application/x-msdownload", "attachment:ext:exe"} <= tokens


def test_a_custom_subject_tag_is_taken_off() -> None:
    message = ParsedMessage(headers=(("Subject", "[JUNK] lunch"),), text="")
    assert "subject:junk" not in tokenize(message, "[JUNK] ")
    assert "subject:junk" in tokenize(message)


@given(st.text(max_size=400))
def test_any_text_tokenizes_to_non_empty_strings(text: str) -> None:
    tokens = text_tokens(text)
    assert all(isinstance(token, str) and token for token in tokens)
    assert text_tokens(text) == tokens  # repeatable


@given(st.lists(st.tuples(st.text(max_size=20), st.text(max_size=100)), max_size=8))
def test_any_header_tokenizes_without_error(headers: list[tuple[str, str]]) -> None:
    assert all(token for token in tokenize_headers(headers))
