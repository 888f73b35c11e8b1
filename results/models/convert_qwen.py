import time, resource, torch, lmedit, json
from lmedit.models.offline import joined_gguf, offline_model_dir
t = time.time(); g = joined_gguf("qwen2.5-1.5b"); t_join = time.time() - t
t = time.time(); d = offline_model_dir("qwen2.5-1.5b"); t_conv = time.time() - t
peak_conv = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.time(); m, tok = lmedit.load_model("qwen2.5-1.5b", dtype="bfloat16"); t_load = time.time() - t
ids = tok("The capital of France is", return_tensors="pt")
out = m.generate(**ids, max_new_tokens=4, do_sample=False)
print(json.dumps({"join_s": round(t_join, 1), "convert_s": round(t_conv, 1), "peak_rss_mb_after_convert": round(peak_conv),
                  "load_bf16_s": round(t_load, 1), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  "model_type": m.config.model_type, "layers": m.config.num_hidden_layers,
                  "greedy": tok.decode(out[0, ids["input_ids"].shape[1]:]), "adapter": lmedit.get_adapter(m).model_type}))
