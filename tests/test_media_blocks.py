"""Pictures, documents and server-tool blocks in a text-only world: each becomes text the model reads,
the same text every time, so a conversation that once carried a screenshot keeps working."""

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import NOT_SHOWN, ApiError, TextBlock, ToolResultBlock, parse_messages_request
from test_http import Reader, assert_error, post

PNG = b"\x89PNG\r\n\x1a\n" + bytes(2040)
JPEG = b"\xff\xd8\xff\xe0" + bytes(500)


def image(data=PNG, media_type="image/png"):
    return {"type": "image", "source": {"type": "base64", "media_type": media_type,
                                        "data": base64.b64encode(data).decode()}}


def pdf(title=None):
    block = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                            "data": base64.b64encode(b"%PDF-1.7 " + bytes(3000)).decode()}}
    return {**block, "title": title} if title else block


def request_with(*blocks, **extra):
    return {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": list(blocks)}], **extra}


def user_blocks(body):
    return parse_messages_request(body).messages[0].content


def test_an_image_becomes_a_placeholder_with_its_type_and_size():
    blocks = user_blocks(request_with(image(), {"type": "text", "text": "What is this?"}))
    assert blocks == (TextBlock(f"[image/png image, 2.0 KB: {NOT_SHOWN}]"), TextBlock("What is this?"))


@pytest.mark.parametrize("source, text", [
    ({"type": "url", "url": "https://example.com/cat.jpg"}, f"[image at https://example.com/cat.jpg: {NOT_SHOWN}]"),
    ({"type": "file", "file_id": "file_011"}, f"[image file file_011: {NOT_SHOWN}]"),
])
def test_images_by_url_or_file_become_placeholders_naming_them(source, text):
    assert user_blocks(request_with({"type": "image", "source": source})) == (TextBlock(text),)


def test_a_pdf_becomes_a_placeholder_and_a_text_document_its_text():
    text_doc = {"type": "document", "title": "Notes", "source": {"type": "text", "media_type": "text/plain",
                                                                 "data": "Buy milk."}}
    listed = {"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": "one"},
                                                                            {"type": "text", "text": "two"}]}}
    blocks = user_blocks(request_with(pdf("Q3 report"), text_doc, listed))
    assert [b.text for b in blocks] == [f'[PDF document "Q3 report", 3.0 KB: {NOT_SHOWN}]', "Notes\n\nBuy milk.",
                                        "one\n\ntwo"]


def test_an_image_inside_a_tool_result_becomes_part_of_the_results_text():
    messages = [{"role": "user", "content": "look"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01", "name": "Read",
                                                   "input": {"file_path": "/tmp/shot.png"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01",
                                              "content": [image(JPEG, "image/jpeg"), pdf()]}]}]
    result = parse_messages_request({"model": "m", "max_tokens": 16, "messages": messages}).messages[2].content[0]
    assert result == ToolResultBlock("toolu_01", f"[image/jpeg image, 0.5 KB: {NOT_SHOWN}]\n\n"
                                                 f"[PDF document, 3.0 KB: {NOT_SHOWN}]", False)


@pytest.mark.parametrize("block, fragment", [
    (image(media_type="image/bmp"), "messages.0.content.0.image.source.base64.media_type: Input should be 'image/jpeg'"),
    (image(JPEG, "image/png"), "messages.0.content.0.image.source.base64.data: Image does not match the provided "
                               "media type image/png"),
    ({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "not base64!"}},
     "image.source.base64.data: invalid base64 data"),
    ({"type": "image", "source": {"type": "path", "path": "/etc/passwd"}}, "image.source: Input tag 'path'"),
    ({"type": "image"}, "messages.0.content.0.source"),
    ({"type": "document", "source": {"type": "base64", "media_type": "text/html", "data": "AA=="}},
     "document.source.base64.media_type: Input should be 'application/pdf'"),
])
def test_malformed_media_is_still_a_400_naming_the_field(block, fragment):
    with pytest.raises(ApiError) as caught:
        parse_messages_request(request_with(block))
    assert caught.value.status == 400 and fragment in caught.value.message


def test_server_tool_blocks_of_a_real_history_are_read_as_text_or_dropped():
    assistant = [
        {"type": "server_tool_use", "id": "srvtoolu_01", "name": "web_search", "input": {"query": "llama"}},
        {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_01", "content": [
            {"type": "web_search_result", "title": "Llamas", "url": "https://example.org/llamas",
             "encrypted_content": "EqQB", "page_age": None}]},
        {"type": "mcp_tool_use", "id": "mcptoolu_01", "name": "lookup", "server_name": "wiki", "input": {"q": 1}},
        {"type": "mcp_tool_result", "tool_use_id": "mcptoolu_01", "is_error": False,
         "content": [{"type": "text", "text": "found"}]},
        {"type": "text", "text": "Done."}]
    user = [{"type": "container_upload", "file_id": "file_01"},
            {"type": "search_result", "source": "https://docs.example", "title": "Guide",
             "content": [{"type": "text", "text": "Step one."}]},
            {"type": "text", "text": "thanks"}]
    messages = [{"role": "user", "content": "search"}, {"role": "assistant", "content": assistant},
                {"role": "user", "content": user}]
    parsed = parse_messages_request({"model": "m", "max_tokens": 16, "messages": messages}).messages
    assert [b.text for b in parsed[1].content] == [
        '[called web_search: {"query": "llama"}]', "[web search results:\n- Llamas <https://example.org/llamas>]",
        '[called wiki/lookup: {"q": 1}]', "[tool result: found]", "Done."]
    assert [b.text for b in parsed[2].content] == ["Guide (https://docs.example)\n\nStep one.", "thanks"]


@given(st.binary(max_size=4000))
def test_a_placeholder_says_the_size_and_nothing_of_the_bytes(data):
    png = b"\x89PNG\r\n\x1a\n" + data
    (block,) = user_blocks(request_with(image(png)))
    assert block.text == f"[image/png image, {len(png) / 1e3:.1f} KB: {NOT_SHOWN}]"


# --- the real server --------------------------------------------------------------------------------

def test_a_conversation_with_a_screenshot_is_answered_and_counted_as_rendered(served, engine):
    body = request_with(image(), {"type": "text", "text": "Describe the screenshot."}, temperature=0)
    with served.raw() as sock:
        sock.sendall(post("/v1/messages", body))
        status, _, answer = Reader(sock).response()
        sock.sendall(post("/v1/messages/count_tokens", body))
        _, _, counted = Reader(sock).response()
    assert status == 200 and json.loads(answer)["content"][0]["text"]
    as_text = request_with({"type": "text", "text": f"[image/png image, 2.0 KB: {NOT_SHOWN}]"},
                           {"type": "text", "text": "Describe the screenshot."})
    assert json.loads(counted)["input_tokens"] == engine.count_tokens(parse_messages_request(as_text))
    assert json.loads(answer)["usage"]["input_tokens"] + json.loads(answer)["usage"]["cache_read_input_tokens"] \
        == json.loads(counted)["input_tokens"]


def test_bad_base64_over_the_wire_is_a_400(served):
    body = request_with({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "%%"}})
    with served.raw() as sock:
        sock.sendall(post("/v1/messages", body))
        assert_error(Reader(sock).response(), 400, "invalid_request_error")
