"""``preftune export`` and ``preftune train --export-gguf``: the GGUF, the Ollama Modelfile, one-line refusals."""

from __future__ import annotations

import dataclasses

import gguf
import pytest

from preftune.cli.main import main
from preftune.config.train_config import TrainConfig
from preftune.model.export_gguf import QUANTS
from preftune.model.export_ollama import CHATML_TEMPLATE, chatml_system, modelfile_text, ollama_name
from preftune.model.tiny import CHAT_TEMPLATE

SMOLLM2_TEMPLATE = (  # SmolLM2-Instruct's: ChatML with a default system turn when the conversation has none
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA2_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                   "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + "
                   "eos_token }}{% endif %}{% endfor %}")


def test_export_writes_the_gguf_and_an_ollama_modelfile(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ship" / "tiny.Q8_0.gguf"
    assert main(["export", str(tiny_model_dir), "--gguf", str(out), "--quant", "q8_0", "--ollama"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"wrote {out} (q8_0, ") and lines[0].endswith(" tensors)")
    assert lines[1] == f"wrote {out.parent / 'Modelfile'}"
    assert lines[2] == f"next: ollama create tiny-q8_0 -f {out.parent / 'Modelfile'} && ollama run tiny-q8_0"
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    modelfile = (out.parent / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny.Q8_0.gguf\n")
    assert f'TEMPLATE """{CHATML_TEMPLATE}"""' in modelfile and "SYSTEM" not in modelfile
    assert modelfile.endswith('PARAMETER stop "</s>"\nPARAMETER stop "<|im_end|>"\n')
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "tiny.Q8_0.gguf"]


def test_refusals_are_one_line(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "adapter_config.json").write_text('{"base_model_name_or_path": "x"}')
    cases = [
        ([str(tmp_path / "adapters")], "has adapter_config.json but no adapter_model.safetensors: nothing to merge"),
        ([str(tmp_path / "missing")], f"model folder not found: {tmp_path / 'missing'}"),
    ]
    for args, expected in cases:
        assert main(["export", *args, "--gguf", str(tmp_path / "x.gguf")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("preftune: error: ") and err[0].endswith(expected)
    assert not (tmp_path / "x.gguf").exists()


def test_export_flags(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", str(tiny_model_dir), "--gguf", str(tmp_path / "x.gguf"), "--quant", "q4_0"])
    assert info.value.code == 2 and "invalid choice: 'q4_0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no abbreviations: --gg is not --gguf
        main(["export", str(tiny_model_dir), "--gg", str(tmp_path / "x.gguf")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["export", "--help"])
    text = capsys.readouterr().out
    assert info.value.code == 0 and "ollama create" in text and "q8_0" in text and "docs/export.md" in text


def test_train_flag_offers_every_quantization():
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == "export_gguf")
    assert tuple(field.metadata["choices"]) == tuple(QUANTS) and field.default is None


def test_train_export_gguf_writes_the_final_model(tiny_model_dir, rule_data, tmp_path, capsys):
    from preftune.model.loading import load_tokenizer

    out = tmp_path / "run1"
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(rule_data["train"]), "--output-dir", str(out),
                 "--max-steps", "2", "--batch-size", "4", "--max-length", "64", "--max-prompt-length", "32",
                 "--no-progress", "-q", "--export-gguf", "f16"])
    assert code == 0 and "done: 2 steps" in capsys.readouterr().out
    target = out / "gguf" / "run1.F16.gguf"
    reader = gguf.GGUFReader(str(target))
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    assert reader.fields["general.base_model.0.name"].contents() == str(tiny_model_dir)  # from the run's config.yaml
    assert (out / "gguf" / "Modelfile").read_text().startswith("FROM ./run1.F16.gguf\n")
    assert not list(out.glob("*.gguf"))  # the run folder itself stays a plain Hugging Face folder
    text = "\n\nHuman: Tell me about the river.\n\nAssistant:"
    assert load_tokenizer(str(target))(text).input_ids == load_tokenizer(str(out))(text).input_ids


def test_train_export_gguf_refused_after_the_model_is_saved(tmp_path, rule_data, tiny_tokenizer, capsys):
    from preftune.model.tiny import tiny_model

    folder = tmp_path / "gpt2-base"
    tiny_model("gpt2", vocab_size=len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    out = tmp_path / "run2"
    code = main(["train", "--model", str(folder), "--data", str(rule_data["train"]), "--output-dir", str(out),
                 "--max-steps", "1", "--batch-size", "4", "--max-length", "64", "--max-prompt-length", "32",
                 "--no-progress", "-q", "--export-gguf", "q8_0"])
    err = [line for line in capsys.readouterr().err.splitlines() if "preftune" in line]  # (and progress bars)
    assert code == 1 and len(err) == 1
    assert err[0] == (f"preftune: error: the final model is saved in {out}, but --export-gguf q8_0 failed: "
                      "architecture 'gpt2' (GPT2LMHeadModel) cannot be exported to GGUF: supported are llama, "
                      "mistral, qwen2")
    assert (out / "model.safetensors").exists() and not (out / "gguf").exists()


# ----------------------------------------------------------------------------------------- Modelfile


class Templated:
    """A stand-in tokenizer: only its chat template matters to the Modelfile."""

    def __init__(self, template):
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        self.inner = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), bos_token="<s>",
                                             eos_token="</s>")
        self.inner.chat_template = template
        self.chat_template = template

    def apply_chat_template(self, *args, **kwargs):
        return self.inner.apply_chat_template(*args, **kwargs)


def test_chatml_templates_are_recognised_by_rendering():
    assert chatml_system(Templated(CHAT_TEMPLATE)) == (True, None)
    assert chatml_system(Templated(SMOLLM2_TEMPLATE)) == (
        True, "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    assert chatml_system(Templated(LLAMA2_TEMPLATE)) == (False, None)
    assert chatml_system(Templated(None)) == (False, None)
    raising = "{{ raise_exception('roles must alternate') }}"
    assert chatml_system(Templated(raising)) == (False, None)


def test_modelfile_text():
    text, has_template = modelfile_text("m.F16.gguf", Templated(SMOLLM2_TEMPLATE), ["<|im_end|>"])
    assert has_template
    assert text == (f'FROM ./m.F16.gguf\n\nTEMPLATE """{CHATML_TEMPLATE}"""\n\n'
                    'SYSTEM "You are a helpful AI assistant named SmolLM, trained by Hugging Face"\n\n'
                    'PARAMETER stop "<|im_end|>"\n')
    text, has_template = modelfile_text("m.gguf", Templated(LLAMA2_TEMPLATE), ["</s>"])
    assert not has_template and text == 'FROM ./m.gguf\n\nPARAMETER stop "</s>"\n'
    assert ollama_name("runs/My_Model.Q8_0.gguf") == "my_model-q8_0"
