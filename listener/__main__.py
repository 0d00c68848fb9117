from listener.cli import main

raise SystemExit(main())
