"""Which tests exercise each hook of ``adapterkit.hookspecs``.

The rule, checked by ``test_docs.py::test_every_hook_has_tests``:

* this map names exactly the hooks of ``adapterkit.hookspecs``: a new hook fails
  the docs tests until its tests are listed here, a removed one until its entry goes;
* each hook lists at least one test, as a pytest node id relative to the
  repository root (``path::test_function`` or ``path::Class::test_method``);
  the conformance suite's tests (``core/adapterkit/testing/contract.py::MethodContract::...``)
  count, since every plugin's contract subclass runs them;
* each listed test exists, and its source exercises the hook: it names the
  hook (calls it, implements it in a test plugin, or says in its docstring which
  hook it tests), or it calls a public operation that the core routes to that
  hook (``ROUTES`` in ``test_docs.py``, the "called by" column of the hook
  reference).
"""

from __future__ import annotations

CONTRACT = "core/adapterkit/testing/contract.py::MethodContract"
BOTTLENECK = "examples/bottleneck/tests/test_bottleneck.py"

HOOK_TESTS: dict[str, list[str]] = {
    "adapterkit_register_methods": [
        "tests/lora/test_registry.py::test_lora_is_found_through_its_entry_point",
        "tests/lora/test_registry.py::test_name_collision_is_a_plugin_error",
        f"{BOTTLENECK}::test_registered_through_the_entry_point",
    ],
    "adapterkit_config_from_dict": [
        "tests/lora/test_configs.py::test_saved_config_dict_with_peft_type",
        f"{BOTTLENECK}::test_saved_config_round_trip",
    ],
    "adapterkit_config_to_dict": [
        "tests/lora/test_configs.py::test_config_to_dict_is_what_peft_saves",
        f"{BOTTLENECK}::test_saved_config_round_trip",
    ],
    "adapterkit_validate_config": [
        "tests/lora/test_configs.py::test_rank_must_be_positive",
        "tests/lora/test_configs.py::test_empty_target_list_is_refused",
        f"{BOTTLENECK}::test_bad_values_are_config_errors",
    ],
    "adapterkit_inject": [
        f"{CONTRACT}::test_inject_changes_only_the_targets",
        f"{CONTRACT}::test_failed_add_leaves_the_model_unchanged",
        "tests/lora/test_semantics.py::test_loading_creates_adapter_weights_on_meta_then_assigns_file_tensors",
        f"{BOTTLENECK}::test_load_injects_on_meta_then_assigns_tensors_on_the_layers_dtype",
    ],
    "adapterkit_set_active": [
        f"{CONTRACT}::test_set_active_and_none",
        "tests/lora/test_lora_peft.py::test_set_active_matches_peft",
        "tests/multi/test_methods_together.py::test_set_active_across_methods_and_disable",
        f"{BOTTLENECK}::test_several_active_adapters_add_their_deltas",
    ],
    "adapterkit_enable": [
        f"{CONTRACT}::test_enable_disable",
        "tests/lora/test_lora_peft.py::test_disable_and_enable_match_peft",
        f"{BOTTLENECK}::test_disable_and_enable",
    ],
    "adapterkit_disable": [
        f"{CONTRACT}::test_enable_disable",
        "tests/lora/test_lora_peft.py::test_disable_and_enable_match_peft",
        f"{BOTTLENECK}::test_disable_and_enable",
    ],
    "adapterkit_delete": [
        f"{CONTRACT}::test_delete_restores_the_model",
        "tests/lora/test_lora_peft.py::test_delete_matches_peft_and_unwraps_layers",
        f"{BOTTLENECK}::test_delete_unwraps_back_to_the_original_layers",
    ],
    "adapterkit_extract_state": [
        f"{CONTRACT}::test_extract_and_load_state_round_trip",
        "tests/multi/test_methods_together.py::test_each_adapter_saves_the_keys_and_tensors_it_has_alone",
        f"{BOTTLENECK}::test_load_injects_on_meta_then_assigns_tensors_on_the_layers_dtype",
    ],
    "adapterkit_load_state": [
        f"{CONTRACT}::test_extract_and_load_state_round_trip",
        f"{CONTRACT}::test_failed_load_leaves_the_model_unchanged",
        f"{BOTTLENECK}::test_load_state_is_strict",
    ],
    "adapterkit_merge": [
        f"{CONTRACT}::test_merge_and_unmerge",
        "tests/lora/test_lora_peft.py::test_merge_and_unmerge_match_peft",
        "tests/multi/test_methods_together.py::test_merge_across_methods",
    ],
    "adapterkit_unmerge": [
        f"{CONTRACT}::test_merge_and_unmerge",
        "tests/lora/test_lora_peft.py::test_merge_and_unmerge_match_peft",
        "tests/lora/test_semantics.py::test_disable_unmerges_first",
    ],
    "adapterkit_per_sample": [
        f"{CONTRACT}::test_per_sample",
        "tests/lora/test_lora_peft.py::test_per_sample_rows_match_peft_mixed_batch",
        f"{BOTTLENECK}::test_per_sample_rows",
    ],
    "adapterkit_layer_adapters": [
        "tests/multi/test_composition.py::test_two_methods_on_the_same_layers_act_in_the_order_they_were_added",
        "tests/multi/test_composition.py::test_a_merge_that_leaves_an_active_adapter_unmerged_inside_is_refused",
        "examples/bottleneck/tests/test_bottleneck_composition.py::test_merging_lora_over_an_active_bottleneck_is_refused",
    ],
    "adapterkit_claim_checkpoint": [
        "tests/multi/test_variant_plugin.py::test_a_folder_written_by_the_variants_own_peft_flow_loads_as_the_variant",
        "tests/multi/test_variant_plugin.py::test_two_plugins_claiming_the_same_files_is_an_error_naming_both",
    ],
    "adapterkit_training_step": [
        "tests/training/test_per_step.py::test_adalora_under_trainer_matches_a_hand_written_peft_loop_step_for_step",
        "tests/training/test_per_step.py::test_training_step_and_regularization_skip_methods_without_per_step_work",
    ],
    "adapterkit_regularization": [
        "tests/training/test_per_step.py::test_regularization_is_the_adalora_term_and_only_for_adapters_being_trained",
        "tests/training/test_per_step.py::test_adalora_under_trainer_matches_a_hand_written_peft_loop_step_for_step",
    ],
    "adapterkit_swap": [
        "tests/serving/test_core_serving.py::test_swap_refuses_what_it_cannot_do",
    ],
    "adapterkit_prepare_compiled": [
        "tests/serving/test_core_serving.py::test_prepare_compiled_checks_its_arguments",
    ],
    "adapterkit_combine": [
        "tests/serving/test_core_serving.py::test_combine_and_prepare_compiled_refuse_methods_without_them",
    ],
    "adapterkit_dispatch": [
        "plugins/dispatch/tests/test_dispatch.py::test_cpu_and_disk_offload_gives_the_undispatched_outputs",
        "plugins/dispatch/tests/test_dispatch.py::test_the_plugin_is_found_through_its_entry_point",
        f"{BOTTLENECK}::test_loads_onto_a_dispatched_model_with_disk_offload",
    ],
}
