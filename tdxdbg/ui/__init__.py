"""The Textual debugger: a thin client of tdxdbg.session."""
