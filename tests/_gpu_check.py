# temporary device check (not committed): packed vs unpacked on CUDA
import sys, torch
sys.path.insert(0, "tests"); sys.path.insert(0, "src")
import conftest
from test_data_batching import token_losses
from chattune.data import DataConfig, batch_plan, collate, prepare
from transformers import PreTrainedTokenizerFast
tok = PreTrainedTokenizerFast(tokenizer_object=conftest._bpe(["<|endoftext|>"]), eos_token="<|endoftext|>", pad_token="<|endoftext|>")
s = prepare(DataConfig(max_length=96), tok).splits["train"][:16]
dev = "cuda"
for arch in ["gpt2", "llama"]:
    for attn in ["sdpa", "eager"]:
        m = conftest.build_model(arch, len(tok), attn).to(dev)
        plan = batch_plan([len(x["input_ids"]) for x in s], 4, packing=True, max_length=192, seed=0, epoch=0)
        mb = plan[0]; ch = [s[i] for i in mb]
        cuda = lambda b: {k: v.to(dev) for k, v in b.items()}
        packed = token_losses(m, cuda(collate(ch, tok.pad_token_id, packing=True, bins=mb.bins)))
        order = [ch[j] for row in mb.bins for j in row]
        alone = torch.cat([token_losses(m, cuda(collate([x], tok.pad_token_id, packing=False))) for x in order])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pb = token_losses(m, cuda(collate(ch, tok.pad_token_id, packing=True, bins=mb.bins)))
            ab = torch.cat([token_losses(m, cuda(collate([x], tok.pad_token_id, packing=False))) for x in order])
        mbf = m.to(torch.bfloat16)
        pbf = token_losses(mbf, cuda(collate(ch, tok.pad_token_id, packing=True, bins=mb.bins)))
        print(arch, attn, "fp32 max diff %.2e" % (packed - alone).abs().max().item(),
              "| autocast bf16 %.2e" % (pb - ab).abs().max().item(),
              "| bf16 weights, f32 mask ok, nan=%s" % bool(pbf.isnan().any()))
