"""Chat templates: SmolLM2's embedded template and the official Qwen2.5, Qwen3 and
Gemma 3 templates (written into test GGUFs and read back), checked against
prompts derived by hand from each template's definition, and against
llama-cpp-python's Jinja2 chat formatter where it is installed; plus the ChatML
fallback for absent, broken and hostile templates."""

from __future__ import annotations

import warnings

import pytest

from runtime.chat_template import ChatTemplateWarning, render_chat, render_chatml
from runtime.gguf import GGUFFile

from _tokenizer_util import write_vocab_gguf

# Official templates, verbatim (Qwen/Qwen2.5-7B-Instruct and Qwen/Qwen3-0.6B
# tokenizer_config.json, google/gemma-3 chat_template).
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

GEMMA3 = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
TURNS = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3? Answer in 中文 😀"},
]


def _im(role, content):
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def _chatml_turns():
    return _im("user", "What is 2+2?") + _im("assistant", "4") + _im("user", "And 3+3? Answer in 中文 😀")


@pytest.fixture(scope="module")
def template_ggufs(tmp_path_factory, smollm2_path):
    """The official templates written into vocab GGUFs, read back as metadata."""
    d = tmp_path_factory.mktemp("templates")
    with GGUFFile(smollm2_path) as g:
        md = dict(g.metadata)
    out = {"smollm2": md["tokenizer.chat_template"]}
    for name, text in [("qwen2.5", QWEN25), ("qwen3", QWEN3)]:
        path = write_vocab_gguf(d / f"{name}.gguf", md, pre="qwen2", chat_template=text)
        with GGUFFile(path) as g:
            out[name] = g.metadata["tokenizer.chat_template"]
        assert out[name] == text
    return out


def _render(template, messages, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a working template must not fall back
        return render_chat(template, messages, **kw)


# ------------------------------------------------------- official templates
def test_smollm2_embedded_template(template_ggufs):
    t = template_ggufs["smollm2"]
    assert _render(t, [SYSTEM] + TURNS) == _im("system", SYSTEM["content"]) + _chatml_turns() + \
        "<|im_start|>assistant\n"
    # without a system message the template supplies SmolLM's own
    default = _im("system", "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    assert _render(t, TURNS, add_generation_prompt=False) == default + _chatml_turns()


def test_qwen25_template(template_ggufs):
    t = template_ggufs["qwen2.5"]
    assert _render(t, [SYSTEM] + TURNS) == _im("system", SYSTEM["content"]) + _chatml_turns() + \
        "<|im_start|>assistant\n"
    default = _im("system", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
    assert _render(t, TURNS, add_generation_prompt=False) == default + _chatml_turns()
    # a tool call and its result (arguments through the tojson filter, non-ASCII kept)
    msgs = [SYSTEM, {"role": "user", "content": "Weather in Zürich?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather",
                                                  "arguments": {"city": "Zürich"}}}]},
            {"role": "tool", "content": "12°C"}]
    assert _render(t, msgs) == (
        _im("system", SYSTEM["content"]) + _im("user", "Weather in Zürich?")
        + '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
          '{"city": "Zürich"}}\n</tool_call><|im_end|>\n'
        + "<|im_start|>user\n<tool_response>\n12°C\n</tool_response><|im_end|>\n"
        + "<|im_start|>assistant\n")


def test_qwen3_template(template_ggufs):
    t = template_ggufs["qwen3"]
    # earlier assistant turns lose their reasoning; the system message comes first
    turns = [TURNS[0], {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
             TURNS[2]]
    expected = _im("system", SYSTEM["content"]) + _chatml_turns()
    assert _render(t, [SYSTEM] + turns) == expected + "<|im_start|>assistant\n"
    assert _render(t, [SYSTEM] + turns, enable_thinking=False) == \
        expected + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert _render(t, turns, add_generation_prompt=False) == _chatml_turns()  # no default system


def test_gemma3_template_and_its_raise_exception():
    msgs = [SYSTEM] + TURNS
    assert _render(GEMMA3, msgs, bos_token="<bos>") == (
        "<bos><start_of_turn>user\nYou are a terse assistant.\n\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n4<end_of_turn>\n"
        "<start_of_turn>user\nAnd 3+3? Answer in 中文 😀<end_of_turn>\n<start_of_turn>model\n")
    bad = [TURNS[0], TURNS[0]]  # roles must alternate: the template raises, we fall back
    with pytest.warns(ChatTemplateWarning, match="Conversation roles must alternate"):
        out = render_chat(GEMMA3, bad, bos_token="<bos>")
    assert out == render_chatml(bad) == _im("user", "What is 2+2?") * 2 + "<|im_start|>assistant\n"


@pytest.mark.parametrize("name", ["smollm2", "qwen2.5", "qwen3"])
def test_same_prompt_as_llama_cpp_python_formatter(name, template_ggufs, llama_cpp):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    t = template_ggufs[name]
    for msgs in ([SYSTEM] + TURNS, TURNS):
        for gen in (True, False):
            ref = Jinja2ChatFormatter(t, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                      add_generation_prompt=gen)(messages=msgs).prompt
            assert _render(t, msgs, add_generation_prompt=gen, bos_token="<|im_start|>",
                           eos_token="<|im_end|>") == ref


# ------------------------------------------------------------------ fallback
@pytest.mark.parametrize("template, why", [
    (None, "no chat template"),
    ("", "no chat template"),
    ("{% for m in messages %}{{ m.content }", "TemplateSyntaxError"),
    ("{{ raise_exception('nope') }}", "nope"),
    ("{{ messages[0].content.upper() + undefined_thing.attr }}", "UndefinedError"),
    # the sandbox: no reaching Python internals, no mutating the inputs
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
    ("{% set _ = messages.append({'role': 'x'}) %}ok", "SecurityError"),
    ("{{ messages.pop() }}", "SecurityError"),
])
def test_absent_or_broken_template_falls_back_to_chatml(template, why):
    msgs = [SYSTEM] + TURNS
    with pytest.warns(ChatTemplateWarning, match=why):
        out = render_chat(template, msgs)
    assert out == _im("system", SYSTEM["content"]) + _chatml_turns() + "<|im_start|>assistant\n"
    assert len(msgs) == 4  # inputs untouched


def test_chatml_fallback_format_and_bad_messages():
    assert render_chatml([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                         add_generation_prompt=False) == "<|im_start|>user\nhi<|im_end|>\n"
    with pytest.raises(ValueError, match="role"):
        render_chat(None, [{"content": "no role"}])
    with pytest.raises(ValueError, match="list"):
        render_chat(None, "hello")


def test_helpers_tojson_and_strftime_now():
    t = "{{ strftime_now('%Y') | length }} {{ {'k': 'é', 'n': [1, 2]} | tojson }}"
    assert _render(t, []) == '4 {"k": "é", "n": [1, 2]}'
    t2 = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}"
    assert _render(t2, TURNS) == "user"  # loopcontrols, as Hugging Face enables them
    t3 = "{% generation %}{{ messages[0].content }}{% endgeneration %}"
    assert _render(t3, TURNS) == "What is 2+2?"
