"""Every change the hub makes at run time to another library's objects, one module per library.

Site-packages stay as installed. Each patch is idempotent, applies only once
its library is imported (``apply`` runs after each handler module import), and
its docstring names the library version it was written against, what goes
wrong without it, and the test that fails without it.
"""

from __future__ import annotations

from mlx_hub.engine.patches import mlx_lm, mlx_openai_server, mlx_vlm, mlx_whisper, upstream_vlm_batch

# Before anything imports upstream's batch scheduler (handler imports come through here).
mlx_lm.install_import_hook()

#: Each patch (as ``MLX_HUB_DISABLE_PATCHES`` names it) and the test that fails without it.
#: ``make proofs`` runs each test with its patch switched off and expects the failure.
PROOFS: dict[str, str] = {
    "stop_sequences": "tests/test_engine.py::test_lm_models_batch_on_the_installed_mlx_lm",
    "thread_local_stream": "tests/test_model_types.py::test_generation_on_another_thread_needs_the_thread_local_stream",
    "whisper_per_folder": "tests/test_model_types.py::test_two_whisper_entries_hold_their_own_weights",
    "serve_like_launch": "tests/test_model_types.py::test_whisper_transcribes_streams_and_frees",
    "share_weights": "tests/test_shared_weights.py::test_two_profiles_share_one_copy",
    "vlm_batching_capability": "tests/test_model_types.py::test_multimodal_chat_with_an_image[on]",
    "batch_failure_frees_its_sequences": "tests/test_memory.py::test_an_allocation_error_fails_that_request_alone[batched]",
    "bound_prompt_cache": "tests/test_engine.py::test_a_budget_bounds_upstreams_prompt_cache",
    "accept_raw_prompts": "tests/test_peer_apis.py::test_completions_plain_stream_and_several_prompts",
    "persistent_prompt_cache": "tests/test_prompt_cache.py::test_restored_cache_answers_as_cold_after_unload_and_restart[lm]",
    "queue_timeout_bounds_waiting": "tests/test_engine.py::test_queue_timeout_bounds_waiting_not_generating",
    "watch_generation_steps": "tests/test_stops.py::test_messages_stop_sequences_end_the_generation[batched]",
    "vlm_batch_per_request_sampling": "tests/test_vlm_batching.py::test_each_request_samples_as_it_asked",
    "vlm_batch_failure_frees_its_sequences": "tests/test_vlm_batching.py::test_a_failed_batch_step_frees_its_sequences",
    "processors_follow_sequences": (
        "tests/test_structured_answers.py::test_a_schema_after_a_plain_request_is_still_constrained[batched]"
    ),
    "vlm_last_step_usage": "tests/test_vlm_answers.py::test_an_empty_answer_is_an_answer[off]",
    "rank_steps": "tests/test_sharded.py::test_a_stopped_rank_fails_the_group_with_its_name",
    "idle_workers_hold_no_kv": "tests/test_memory.py::test_a_finished_request_leaves_no_kv_in_memory[single]",
    "transformers_without_torch": "tests/test_lean_process.py::test_a_text_hub_leaves_torch_to_its_core",
}


def apply() -> None:
    """Apply every patch whose library is imported by now; safe to call often."""
    mlx_lm.processors_follow_sequences()
    mlx_vlm.apply()
    mlx_whisper.apply()
    mlx_openai_server.apply()
    upstream_vlm_batch.apply()  # after vlm_batching_capability has judged the installed mlx-vlm
