"""loraforge: base LLM + dataset -> LoRA/QLoRA adapter, merged model and GGUF files, with quality gates.

The installed top-level package is `loraforge` (never `tasks` or `flows`, names other distributions use): the
stages are `loraforge.tasks`, the orchestration `loraforge.flows`. In the repository they stay top-level folders
(tasks/, flows/); loraforge/tasks and loraforge/flows are links to them.
"""
