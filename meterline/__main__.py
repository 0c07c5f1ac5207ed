from meterline.cli import main

# Guarded: a process started by multiprocessing ("spawn") imports this module again.
if __name__ == "__main__":
    main()
