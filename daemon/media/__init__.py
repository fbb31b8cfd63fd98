"""What callers hear: fetching URLs safely (``fetch``), decoding and normalising audio (``audio``),
speech (``tts``), and the content-addressed library that ties them together (``library``)."""
