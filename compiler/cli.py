def main():
    raise SystemExit("epc: CLI not yet built")
