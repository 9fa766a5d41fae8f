"""Model cards and Hub publishing for hf_gpt folders.

- `generate`: `write_card(run_dir)` / `hf-gpt card RUN_DIR` write README.md (the model card).
- `push`: `push_folder(run_dir, repo_id)` / `hf-gpt push RUN_DIR REPO_ID [--dry-run]` upload a folder.
- `checks`: offline validation of a folder and of its card.
"""
