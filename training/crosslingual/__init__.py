"""Cross-lingual embedding evaluation (issue #15): translation retrieval and an STS proxy against a teacher."""
