"""The sampling engine: answers to prompts, seeded and resumable, with any steering edits active."""
