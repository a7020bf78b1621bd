"""Centralized: the upper bound of Table 1; the LLM's adapter fine-tuned on all client shards plus D^a."""

from __future__ import annotations

from functools import cached_property

from fedcollm.algorithms.training import sft_steps, unit_seed
from fedcollm.data.batching import SFTData
from fedcollm.methods.base import Budget, Method, States
from fedcollm.models.lora import adapter_state, load_adapter_state


class Centralized(Method):
    """No clients: the server holds every example and trains the LLM for E epochs a round."""

    name = "centralized"
    trains = True
    needs_client_data = True

    @cached_property
    def union(self) -> SFTData:
        wb = self.wb
        return SFTData([ex for shard in wb.split.clients for ex in shard] + wb.split.aux, wb.tokenizer,
                       wb.cfg.model.max_length)

    def server_update(self, states: States, r: int) -> tuple[States, dict, dict]:
        wb, fed, union = self.wb, self.wb.cfg.federation, self.union
        load_adapter_state(wb.llm, states["llm"])
        log = sft_steps(wb.llm, union, fed.local_epochs * union.steps_per_epoch(fed.batch_size), fed.client_lr,
                        fed.batch_size, unit_seed(wb.cfg.run.seed, r, -1), f"centralized LLM SFT r{r}",
                        train=wb.cfg.train)
        steps = len(log.losses)
        return (states | {"llm": adapter_state(wb.llm)},
                {"train_loss": log.mean_loss,
                 "budget": Budget(llm_steps=steps, llm_examples=steps * fed.batch_size)},
                {"server_train_s": log.seconds})
