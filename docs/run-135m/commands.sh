# The real run (issue 17): SmolLM2-135M on input.txt with train.py's defaults (batch 4 x 256, LR 3e-4
# cosine to 3e-5, seed 1337, bf16 where the CPU has native bf16), plus --ckpt auto, a checkpoint
# every 250 steps and the run folder ~/run-135m. Re-running the first line after any stop continues
# the run exactly; the second adds the 50 resumed steps (settings not given come from the checkpoint).
python train.py --steps 5000 --ckpt auto --ckpt-interval 250 --save ~/run-135m/checkpoint.pt --metrics ~/run-135m/metrics.jsonl --plot ~/run-135m/loss.png
python train.py --steps 5050 --ckpt ~/run-135m/checkpoint.pt
