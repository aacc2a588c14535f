# The whole pipeline, one documented CLI call per stage, with the default paths.
#   make pipeline        raw text -> tokenizer -> pretrained -> SFT -> reward -> RLHF/DPO/RLVF -> classifier
#                        -> evaluated -> INT8 -> served on 127.0.0.1 and load-tested
#   make sft             any stage alone (it reads what the stage before it wrote under models/)
#   make -n pipeline     print the commands without running them
#   make speedrun        raw text -> tokenizer -> pretrained -> SFT -> benchmarks -> report, in models/speedrun/
#                        (SIZE=cpu|gpu|gpus|auto; docs/speedrun.md)
# Each stage's outputs go to models/<stage>/; rerunning a stage moves its earlier run to models/<stage>/previous/.

PYTHON ?= python
HOST ?= 127.0.0.1
PORT ?= 8000
USERS ?= 8
LOAD_SECONDS ?= 30s
SIZE ?= auto

.PHONY: pipeline tokenizer pretrain sft reward rlhf dpo rlvf classify eval quantize serve loadtest test speedrun \
	benchmark_tasks

pipeline: tokenizer pretrain sft reward rlhf dpo rlvf classify eval quantize loadtest

tokenizer:
	$(PYTHON) byte_level_bpe.py --input data/pretrain/train.txt --vocab_size 8192 --output models/bpe_tokenizer

pretrain:
	$(PYTHON) pretrain_trainer.py --tokenizer_dir models/bpe_tokenizer --output_dir models/pretrain

sft:
	$(PYTHON) finetune.py --mode sft --pretrained_model models/pretrain/pretrain_best.pth --output_dir models/sft

reward:
	$(PYTHON) finetune.py --mode reward --sft_model models/sft/sft_best.pth --output_dir models/reward

rlhf:
	$(PYTHON) finetune.py --mode rlhf --sft_model models/sft/sft_best.pth \
		--reward_model models/reward/reward_best.pth --output_dir models/rlhf

dpo:
	$(PYTHON) finetune.py --mode dpo --sft_model models/sft/sft_best.pth --output_dir models/dpo

rlvf:
	$(PYTHON) finetune.py --mode rlvf --sft_model models/sft/sft_best.pth --output_dir models/rlvf

classify:
	$(PYTHON) finetune.py --mode classify --pretrained_model models/pretrain/pretrain_best.pth \
		--output_dir models/classify

eval:
	$(PYTHON) evaluator.py --model_type sft --compare models/pretrain/pretrain_best.pth models/sft/sft_best.pth \
		models/rlhf/ppo_best.pth models/dpo/dpo_best.pth models/rlvf/rlvf_best.pth \
		--reward_model models/reward/reward_best.pth --test_data_path data/sft/sft_test.json --max_new_tokens 16 \
		--output models/eval_report.json --plot models/eval_compare.png

quantize:
	$(PYTHON) -m inference.quantizer --model_path models/sft/sft_best.pth --output models/sft/sft_best_int8.pth

serve:
	$(PYTHON) -m inference.api_service --host $(HOST) --port $(PORT)

# Starts the server in the background, waits for /health, runs a bounded headless Locust test, stops the server.
loadtest:
	$(PYTHON) -m inference.api_service --host $(HOST) --port $(PORT) & server=$$!; \
	trap 'kill $$server' EXIT; \
	for i in $$(seq 120); do curl -sf http://$(HOST):$(PORT)/health >/dev/null && break; sleep 1; done; \
	locust -f inference/load_test.py --headless -u $(USERS) -r $(USERS) -t $(LOAD_SECONDS) --host http://$(HOST):$(PORT)

test:
	$(PYTHON) -m pytest -q

# One command from raw text to a served chat model: every stage's CLI in turn, a report, resumable (docs/speedrun.md).
speedrun:
	$(PYTHON) -m runs.speedrun --size $(SIZE)

# The project's own benchmark tasks in the standard formats (committed in data/benchmarks/; this rebuilds them).
benchmark_tasks:
	$(PYTHON) -m data.build_benchmark_tasks --output_dir data/benchmarks
