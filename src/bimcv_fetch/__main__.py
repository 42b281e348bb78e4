from bimcv_fetch.cli import main

if __name__ == "__main__":
    main()
