FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api api
COPY worker worker
COPY shared shared
COPY fakeprovider fakeprovider
COPY migrations migrations
RUN pip install --no-cache-dir -e .
EXPOSE 8080
CMD ["ferry", "api"]
