"""The text files beside an exported GGUF: an Ollama ``Modelfile`` and a short README.

Ollama does not run the Jinja chat template stored in the GGUF; its ``TEMPLATE`` is a Go
template. Translating arbitrary Jinja is not possible, so the Go template is built from the
same markup pieces chattune renders a conversation with (``data.render.turn_pieces``) on
a probe conversation: the markup before and after a user's text (the first user turn may
carry a system preamble, e.g. SmolLM2's), and before and after an answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from chattune.data import stop_strings, turn_token_ids
from chattune.data.render import turn_pieces
from chattune.engine import DEFAULTS

_PROBE = [{"role": "user", "content": "\ue000"}, {"role": "assistant", "content": "\ue001"},
          {"role": "user", "content": "\ue002"}, {"role": "assistant", "content": "\ue003"}]


@dataclass(frozen=True)
class Markup:
    """The template's markup around each message's text."""

    first_user: str  # before the first user message (may include a system preamble)
    user: str  # before any later user message
    after_user: str  # after a user message: the assistant header (the generation prompt)
    assistant: str  # before an answer, after the generation prompt
    after_assistant: str  # after an answer: EOS or the end-of-turn marker

    def render(self, messages: list[dict], generation_prompt: bool = True) -> str:
        """What the Modelfile's TEMPLATE renders for ``messages`` (system turns skipped)."""
        out, first = [], True
        for m in messages:
            if m["role"] == "user":
                out += [self.first_user if first else self.user, m["content"], self.after_user]
                first = False
            elif m["role"] == "assistant":
                out += [self.assistant, m["content"], self.after_assistant]
        if not generation_prompt and out and messages[-1]["role"] == "user":
            out[-1] = ""
        return "".join(out)


def markup(tokenizer, template: str) -> Markup:
    """The run template's markup, read off a probe conversation."""
    turns = turn_pieces(_PROBE, tokenizer, template)

    def around(pieces) -> tuple[str, str]:
        i = next(k for k, (_, is_text) in enumerate(pieces) if is_text)
        return "".join(t for t, _ in pieces[:i]), "".join(t for t, _ in pieces[i + 1:])

    first, _ = around(turns[0][0])
    user, after_user = around(turns[1][0])
    assistant, after_assistant = around(turns[1][1])
    return Markup(first, user, after_user, assistant, after_assistant)


def _go(text: str) -> str:
    return text.replace("{{", '{{ "{{" }}')  # literal braces in Go template text


def go_template(m: Markup) -> str:
    """The Ollama TEMPLATE: ``Markup.render`` written as a Go template."""
    return ('{{ $first := true }}{{ range .Messages }}{{ if eq .Role "user" }}'
            f'{{{{ if $first }}}}{_go(m.first_user)}{{{{ $first = false }}}}{{{{ else }}}}{_go(m.user)}{{{{ end }}}}'
            f'{{{{ .Content }}}}{_go(m.after_user)}'
            f'{{{{ else if eq .Role "assistant" }}}}{_go(m.assistant)}{{{{ .Content }}}}{_go(m.after_assistant)}'
            '{{ end }}{{ end }}')


def stops(tokenizer, template: str) -> list[str]:
    """Every marker that ends an answer: EOS, the end-of-turn and turn-opening tokens, stop strings."""
    ends, opens = turn_token_ids(tokenizer, template)
    ids = [tokenizer.eos_token_id, *ends, *opens]
    return list(dict.fromkeys([tokenizer.convert_ids_to_tokens(i) for i in ids] + stop_strings(template, tokenizer)))


def modelfile(model_file: str, tokenizer, template: str, adapter_file: str | None = None) -> str:
    """An Ollama Modelfile: FROM (and ADAPTER), TEMPLATE, stops and the shipped sampling defaults."""
    template_text = go_template(markup(tokenizer, template))
    if '"""' in template_text:
        template_text = template_text.replace('"""', '{{ "\\"\\"\\"" }}')
    lines = [f"FROM ./{model_file}"]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    lines.append(f'TEMPLATE """{template_text}"""')
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops(tokenizer, template)]
    lines += [f"PARAMETER temperature {DEFAULTS.temperature}", f"PARAMETER top_p {DEFAULTS.top_p}",
              f"PARAMETER top_k {DEFAULTS.top_k}", f"PARAMETER repeat_penalty {DEFAULTS.repetition_penalty}"]
    return "\n".join(lines) + "\n"


def readme(name: str, model_file: str, summary: str, adapter_file: str | None = None) -> str:
    """OUT/README.md: what the files are and the lines that run them."""
    lora = f" --lora {adapter_file}" if adapter_file else ""
    what = (f"`{model_file}` is the base model and `{adapter_file}` the LoRA adapter (llama.cpp applies it at load)"
            if adapter_file else f"`{model_file}` holds the fine-tuned weights (the method merged in)")
    return f"""# {name} as GGUF

{what}; the chat template and stop tokens are in the GGUF metadata, and `Modelfile` restates
them for Ollama together with chattune's sampling defaults. Written by `chattune export --format gguf`:
{summary}.

## Ollama

```bash
ollama create {name} -f Modelfile
ollama run {name}
```

## llama.cpp

```bash
llama-server -m {model_file}{lora} --jinja      # OpenAI-compatible API on http://127.0.0.1:8080
llama-cli -m {model_file}{lora} --jinja -cnv    # chat in the terminal
```

Ollama's `repeat_penalty` also counts the prompt's last 64 tokens; chattune's repetition
penalty counts generated tokens only, so sampled answers differ slightly. Greedy answers
(`--temp 0`) are the same tokens as `chattune chat --temperature 0` at f32.
"""
