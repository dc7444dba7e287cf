# The two set-up commands (README): `make serve` and `make test`. Both build the environment once.
.PHONY: serve test
serve:
	bash scripts/serve.sh
test:
	bash scripts/test.sh
