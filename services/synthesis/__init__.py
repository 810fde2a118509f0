"""What a synthesis needs wherever it runs, the gateway's live Synthesize and the jobs service alike: the
request's checks, its estimates, the calls to text_parser, acoustic and llm, and the stream of responses."""
